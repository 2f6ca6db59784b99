"""NF4 with double-quantized scales, as free functions on plain tensors; same bytes as bitsandbytes.

    packed, state = nf4_quantize(W, blocksize=64, double_quant=True)
    W_hat = nf4_dequantize(packed, state, dtype=torch.bfloat16)

The storage format and its plain-PyTorch reference are in nf4_format.py (the math is there);
these two pick the native CPU loop of minilora.kernels for large CPU tensors when it builds, and
the reference otherwise. Both give the same bytes and values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from minilora.kernels import native as native_kernels

from .nf4_format import (  # noqa: F401 - the format's names, importable from here as before
    BLOCKSIZES, DYNAMIC_MAP, NF4_BOUNDS, NF4_LEVELS, SCALE_BLOCK, NF4State, blockwise_absmax_scale,
    check_blocksize, check_scales, check_state, dynamic_map, pack_reference, quantize_scales, unpack,
    unpack_reference,
)


def nf4_quantize(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 native: Optional[bool] = None) -> tuple[torch.Tensor, NF4State]:
    """W (any shape, fp16/bf16/fp32) -> (packed uint8 [(n+1)//2], NF4State).

    `native`: None picks the compiled CPU loop for large CPU tensors when it is available, False
    forces the torch reference, True forces the native loop. All give the same bytes."""
    if not W.is_floating_point():
        raise TypeError(f"nf4_quantize needs a floating-point weight, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"nf4_quantize got an empty tensor of shape {tuple(W.shape)}: nothing to quantize")
    check_blocksize(blocksize)
    flat = W.detach().reshape(-1)  # (n,), row-major
    packed, absmax = native_kernels.pack(flat, blocksize, native)
    state = NF4State(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize, double_quant=False)
    if double_quant:
        codes, absmax2, offset = quantize_scales(absmax)
        state = replace(state, absmax=codes, absmax2=absmax2, offset=offset, double_quant=True)
    return packed, state


def nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None,
                   native: Optional[bool] = None) -> torch.Tensor:
    """(packed, state) -> W_hat of state.shape: level × absmax in fp32, rounded once to `dtype`.
    `native` as in `nf4_quantize`; both paths give identical values."""
    dtype = dtype or state.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"nf4_dequantize produces floating-point weights; {dtype} is not (use bfloat16, float16, float32)")
    check_state(packed, state)
    return native_kernels.dequantize(packed, state, dtype, native)
