"""NF4 quantize and dequantize of a 4096×4096 bf16 weight on the CPU: minilora against bitsandbytes
(and torchao's NF4 where installed), double quant on, blocksize 64.

    python benchmarks/nf4_speed.py [--size 4096 --repeats 15]

Interleaved, medians, ratios against bitsandbytes measured in the same run; also GB/s of the
dequantized output. Writes benchmarks/results/nf4_speed.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minilora.quant import nf4_dequantize, nf4_quantize
from _common import RESULTS, interleaved_medians, write_results


def peers(W: torch.Tensor) -> dict[str, dict]:
    out = {}
    packed, state = nf4_quantize(W, 64, True)
    out["minilora"] = {"quantize": lambda: nf4_quantize(W, 64, True), "dequantize": lambda: nf4_dequantize(packed, state)}
    out["minilora (torch reference)"] = {"quantize": lambda: nf4_quantize(W, 64, True, native=False),
                                         "dequantize": lambda: nf4_dequantize(packed, state, native=False)}
    try:
        import bitsandbytes.functional as bnbf

        bp, bs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        out["bitsandbytes"] = {"quantize": lambda: bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True,
                                                                     quant_type="nf4"),
                               "dequantize": lambda: bnbf.dequantize_4bit(bp, bs)}
    except ImportError:
        print("bitsandbytes is not installed: no peer")
    try:
        from torchao.dtypes.nf4tensor import to_nf4

        t = to_nf4(W, 64, 256)
        out["torchao"] = {"quantize": lambda: to_nf4(W, 64, 256), "dequantize": lambda: t.get_original_weight()}
    except ImportError:
        print("torchao is not installed: measured without it")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "nf4_speed")
    args = parser.parse_args(argv)
    W = (torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    fns = peers(W)
    median = interleaved_medians({(p, op): fn for p, ops in fns.items() for op, fn in ops.items()}, args.repeats)
    rows = {}
    for p in fns:
        rows[p] = {op: {"ms": 1e3 * median[(p, op)],
                        "speedup vs bitsandbytes": median[("bitsandbytes", op)] / median[(p, op)]
                        if ("bitsandbytes", op) in median else None}
                   for op in ("quantize", "dequantize")}
        rows[p]["dequantize"]["output GB/s"] = W.numel() * 2 / median[(p, "dequantize")] / 1e9
    table = ["| implementation | quantize: speed-up vs bitsandbytes | dequantize: speed-up vs bitsandbytes | dequantize GB/s |",
             "|---|---:|---:|---:|"]
    for p, r in rows.items():
        q, d = r["quantize"]["speedup vs bitsandbytes"], r["dequantize"]["speedup vs bitsandbytes"]
        table.append(f"| {p} | {q:.2f}× | {d:.2f}× | {r['dequantize']['output GB/s']:.1f} |" if q else f"| {p} | – | – | |")
    print(f"{args.size}×{args.size} bf16, blocksize 64, double quant, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    write_results(args.out, table, {"size": args.size, "repeats": args.repeats, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
