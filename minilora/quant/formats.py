"""FP4 and symmetric Int4 with NF4's block layout, for comparison only.

All three store a 4-bit code per weight and an fp32 absmax per block; only the 16 levels differ:

    NF4   quantiles of N(0, 1), rescaled to [-1, 1]: dense near zero, where normal weights are
    FP4   bitsandbytes' e2m1 float: 0, ±0.0052, ±1/6, ±1/4, ±1/3, ±1/2, ±2/3, ±1
    Int4  symmetric integers k/7, k = -7..7 (15 evenly spaced levels, one code unused)

`quantization_error` measures each on the same weights: the QLoRA paper's claim is that NF4,
being information-theoretically matched to normal data, has the lowest error on normal weights.
"""

from __future__ import annotations

import torch

from .nf4 import NF4_LEVELS, blockwise_absmax_scale, check_blocksize

FP4_LEVELS = torch.tensor(sorted([0.0, 0.005208333333, 0.16666667, 0.25, 0.33333333, 0.5, 0.66666667, 1.0,
                                  -0.005208333333, -0.16666667, -0.25, -0.33333333, -0.5, -0.66666667, -1.0, 0.0]))
INT4_LEVELS = torch.arange(-7, 8, dtype=torch.float32) / 7
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}


def fake_quantize(W: torch.Tensor, fmt: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """W → the nearest representable W in `fmt` (blockwise absmax scaling), in fp32, same shape."""
    check_blocksize(blocksize)
    levels = LEVELS[fmt].to(W.device)
    A = W.detach().reshape(-1).float()
    absmax, scaled = blockwise_absmax_scale(A, blocksize)  # (n_blocks,), (n,)
    codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2)  # nearest level, ties to the lower
    per_value = absmax.repeat_interleave(blocksize)[: A.numel()]
    return (levels[codes] * per_value).view(W.shape)


def quantization_error(W: torch.Tensor, blocksize: int = 64) -> dict[str, dict[str, float]]:
    """Mean squared and mean absolute error of each 4-bit format on W."""
    out = {}
    for fmt in LEVELS:
        err = fake_quantize(W, fmt, blocksize) - W.float()
        out[fmt] = {"mse": err.square().mean().item(), "mae": err.abs().mean().item()}
    return out
