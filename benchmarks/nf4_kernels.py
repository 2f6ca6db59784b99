"""The NF4 kernels: y = x · dequant(W)ᵀ and standalone dequant, against bf16 matmul, the torch
reference, and bitsandbytes.

    python benchmarks/nf4_kernels.py            # on a GPU: the Triton kernels; on a CPU: the reference path

On a GPU, for LLaMA-7B-like weights (4096×4096, 4096×11008, 11008×4096) and M ∈ {1, 16, 128, 2048}:
time (triton.testing.do_bench), TFLOP/s, GB/s counting 0.516 bytes per weight (4-bit codes plus
double-quantized scales) plus activations, % of the device's memory bandwidth (measured here with a
device-to-device copy), and ratios against (a) bf16 torch.matmul on the unquantized weight, (b) the
torch reference dequant + matmul, (c) bitsandbytes' matmul_4bit / dequantize_4bit. Without a GPU it
times the reference path on small shapes with the same table, and says that GPU figures need a GPU.
Writes benchmarks/results/nf4_kernels.{json,md,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minilora.kernels import nf4_dequantize, nf4_matmul
from minilora.quant import nf4_quantize
from _common import RESULTS, interleaved_medians, write_results

BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # ≈ 0.516


def timer(cuda: bool, repeats: int):
    """Seconds per call: do_bench on a GPU, interleaved medians on a CPU."""
    if cuda:
        import triton.testing

        return lambda fns: {k: triton.testing.do_bench(f) / 1e3 for k, f in fns.items()}
    return lambda fns: interleaved_medians(fns, repeats)


def bandwidth(cuda: bool) -> float:
    """Bytes/s of a large device copy (read + write): the yardstick for % of bandwidth."""
    a = torch.empty(1 << 28 if cuda else 1 << 24, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    b = torch.empty_like(a)
    seconds = timer(cuda, 5)({"copy": lambda: b.copy_(a)})["copy"]
    return 2 * a.numel() / seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "nf4_kernels")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        shapes, ms, label = [(4096, 4096), (11008, 4096), (4096, 11008)], [1, 16, 128, 2048], torch.cuda.get_device_name()
    else:
        shapes, ms, label = [(512, 512), (1376, 512), (512, 1376)], [1, 16, 128], "CPU (reference path)"
        print("No GPU here: timing the torch reference path on small shapes. The Triton kernels' figures need a GPU.")
    peak = bandwidth(cuda)
    time_fns = timer(cuda, args.repeats)
    rows = []
    for (N, K) in shapes:
        W = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
        packed, state = nf4_quantize(W, 64, True)
        backend = "triton" if cuda else "torch"
        fns = {"dequant": lambda: nf4_dequantize(packed, state, torch.bfloat16, backend=backend)}
        bnb = None
        try:
            import bitsandbytes.functional as bnbf

            bnb = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            fns["bnb dequant"] = lambda: bnbf.dequantize_4bit(*bnb)
        except (ImportError, RuntimeError):
            pass
        times = time_fns(fns)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            mm = {"nf4_matmul": lambda: nf4_matmul(x, packed, state, backend=backend),
                  "bf16 matmul": lambda: x @ W.t(),
                  "reference dequant + matmul": lambda: nf4_matmul(x, packed, state, backend="torch")}
            if bnb is not None:
                import bitsandbytes as bnb_lib

                mm["bnb matmul_4bit"] = lambda: bnb_lib.matmul_4bit(x, bnb[0].t(), bnb[1])
            t = time_fns(mm)
            moved = N * K * BYTES_PER_WEIGHT + 2 * (M * K + M * N)  # weights + activations in and out
            row = {"N×K": f"{N}×{K}", "M": M, "ms": 1e3 * t["nf4_matmul"],
                   "TFLOP/s": 2 * M * N * K / t["nf4_matmul"] / 1e12, "GB/s": moved / t["nf4_matmul"] / 1e9,
                   "% bandwidth": 100 * moved / t["nf4_matmul"] / peak,
                   "vs bf16 matmul": t["bf16 matmul"] / t["nf4_matmul"],
                   "vs reference": t["reference dequant + matmul"] / t["nf4_matmul"],
                   "vs bnb matmul_4bit": t["bnb matmul_4bit"] / t["nf4_matmul"] if "bnb matmul_4bit" in t else None,
                   "dequant vs bnb": times["bnb dequant"] / times["dequant"] if "bnb dequant" in times else None}
            rows.append(row)
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    table = [f"Device: {label}; copy bandwidth {peak / 1e9:.0f} GB/s. Speed-ups > 1 favour nf4_matmul.", "",
             "| N×K | M | ms | TFLOP/s | GB/s | % bandwidth | vs bf16 matmul | vs reference | vs bnb matmul_4bit | dequant vs bnb |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['N×K']} | {r['M']} | {r['ms']:.3f} | {r['TFLOP/s']:.3f} | {r['GB/s']:.1f} | {r['% bandwidth']:.0f} | "
                     f"{fmt(r['vs bf16 matmul'])} | {fmt(r['vs reference'])} | {fmt(r['vs bnb matmul_4bit'])} | "
                     f"{fmt(r['dequant vs bnb'])} |")
    write_results(args.out, table, {"device": label, "copy_bandwidth_GBps": peak / 1e9, "rows": rows})
    plot(rows, args.out.with_suffix(".png"), label)
    return {"device": label, "rows": rows}


def plot(rows, path: Path, label: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for shape in dict.fromkeys(r["N×K"] for r in rows):
        pts = [r for r in rows if r["N×K"] == shape]
        ax.plot([r["M"] for r in pts], [r["GB/s"] for r in pts], marker="o", label=shape)
    ax.set(xscale="log", xlabel="M (rows of x)", ylabel="GB/s (weights + activations)", title=f"nf4_matmul on {label}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
