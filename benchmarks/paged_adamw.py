"""PagedAdamW's step time against torch.optim.AdamW (foreach) on the CPU, and state on the device.

    python benchmarks/paged_adamw.py [--sizes 1e6,1e7,5e7 --repeats 9]

Each size is 8 parameter tensors with random gradients. Both optimizers step the same sizes in
an interleaved order; the medians are reported as ratios. "Device-resident state" is AdamW's
whole state (it keeps all of it beside the parameters) against PagedAdamW's peak: the pages that
were on the device at once. Writes benchmarks/results/paged_adamw.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minilora.optim import PagedAdamW
from _common import RESULTS, interleaved_medians, write_results


def params(n: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(8):
        p = torch.nn.Parameter(torch.randn(n // 8, generator=g))
        p.grad = torch.randn(n // 8, generator=g)
        out.append(p)
    return out


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
        median = interleaved_medians({"adamw": torch_opt.step, "paged": paged.step}, args.repeats)  # warm-up allocates
        adamw_bytes = sum(t.numel() * t.element_size() for s in torch_opt.state.values() for k, t in s.items() if k != "step")
        rows[size] = {
            "paged / adamw step time": median["paged"] / median["adamw"],
            "adamw device state MB": adamw_bytes / 2**20,
            "paged peak device state MB": paged.peak_device_state_bytes / 2**20,
        }
    table = ["| parameters | PagedAdamW / AdamW(foreach) step time | AdamW state on device (MB) | PagedAdamW peak on device (MB) |",
             "|---:|---:|---:|---:|"]
    for size, r in rows.items():
        table.append(f"| {size:,} | {r['paged / adamw step time']:.3f} | {r['adamw device state MB']:.0f} | "
                     f"{r['paged peak device state MB']:.0f} |")
    print(f"{args.repeats} repeats, medians, {torch.get_num_threads()} threads, page {args.page_mb} MB")
    write_results(args.out, table, {"config": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
