"""nf4_dequant: packed NF4 codes + (double-quantized) block scales -> a dense weight.

Inputs (storage format in minilora/quant/nf4.py):
    packed  uint8 [(n+1)//2]    two 4-bit codes per byte, first element in the high nibble
    state   NF4State            absmax fp32 [n_blocks] (or uint8 codes + absmax2 + offset), shape, blocksize
Output:
    W_hat   dtype, state.shape  NF4_LEVELS[code] × absmax[block], in fp32, rounded once to dtype

The torch reference below is the oracle for the Triton kernel and the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch

from minilora.quant.nf4 import NF4State, nf4_dequantize

from .dispatch import TRITON_KERNELS, pick


def nf4_dequant_reference(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain PyTorch: unpack, look up the levels, scale per block."""
    return nf4_dequantize(packed, state, dtype)


def nf4_dequant(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None,
                backend: str = "auto") -> torch.Tensor:
    """The dense weight W_hat (state.shape, dtype): Triton on CUDA when available, else the reference."""
    if pick("nf4_dequant", backend, packed) == "triton":
        return TRITON_KERNELS["nf4_dequant"](packed, state, dtype)
    return nf4_dequant_reference(packed, state, dtype)
