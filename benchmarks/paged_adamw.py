"""PagedAdamW's step time against torch.optim.AdamW (foreach) on the CPU, and state on the device.

    python benchmarks/paged_adamw.py [--sizes 1e6,1e7,5e7 --repeats 9]

Each size is 8 parameter tensors with random gradients. Both optimizers step the same sizes in
an interleaved order; the medians are reported as ratios. "Device-resident state" is AdamW's
whole state (it keeps all of it beside the parameters) against PagedAdamW's peak: the pages that
were on the device at once. Writes benchmarks/results/paged_adamw.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minilora.optim import PagedAdamW

RESULTS = Path(__file__).parent / "results"


def params(n: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(8):
        p = torch.nn.Parameter(torch.randn(n // 8, generator=g))
        p.grad = torch.randn(n // 8, generator=g)
        out.append(p)
    return out


def timed(opt) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,5e7")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--page-mb", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "paged_adamw")
    args = parser.parse_args(argv)
    rows = {}
    for size in (int(float(s)) for s in args.sizes.split(",")):
        torch_opt = torch.optim.AdamW(params(size, 0), lr=1e-3, foreach=True)
        paged = PagedAdamW(params(size, 0), lr=1e-3, page_bytes=args.page_mb << 20)
        times = {"adamw": [], "paged": []}
        for i in range(args.repeats + 1):
            for name, opt in ((("adamw", torch_opt), ("paged", paged)) if i % 2 else (("paged", paged), ("adamw", torch_opt))):
                t = timed(opt)
                if i > 0:  # the first step allocates the state
                    times[name].append(t)
        adamw_bytes = sum(t.numel() * t.element_size() for s in torch_opt.state.values() for k, t in s.items() if k != "step")
        rows[size] = {
            "paged / adamw step time": statistics.median(times["paged"]) / statistics.median(times["adamw"]),
            "adamw device state MB": adamw_bytes / 2**20,
            "paged peak device state MB": paged.peak_device_state_bytes / 2**20,
        }
    table = ["| parameters | PagedAdamW / AdamW(foreach) step time | AdamW state on device (MB) | PagedAdamW peak on device (MB) |",
             "|---:|---:|---:|---:|"]
    for size, r in rows.items():
        table.append(f"| {size:,} | {r['paged / adamw step time']:.3f} | {r['adamw device state MB']:.0f} | "
                     f"{r['paged peak device state MB']:.0f} |")
    print(f"{args.repeats} repeats, medians, {torch.get_num_threads()} threads, page {args.page_mb} MB")
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    return rows


if __name__ == "__main__":
    main()
