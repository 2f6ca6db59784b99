"""nf4_dequant: packed NF4 codes + (double-quantized) block scales -> a dense weight, in one pass.

Inputs (storage format in minilora/quant/nf4.py):
    packed  uint8 [(n+1)//2]    two 4-bit codes per byte, first element in the high nibble
    state   NF4State            absmax fp32 [n_blocks], or (double quant) uint8 codes into the
                                256-entry dynamic map + absmax2 fp32 [n_blocks/256] + offset fp32
Output:
    W_hat   dtype, state.shape  NF4_LEVELS[code] × absmax[block], in fp32, rounded once to dtype

The Triton kernel rebuilds each block's absmax (code8 → dynamic map → × absmax2 + offset) and the
NF4 values in the same pass; the torch reference below is its test oracle and the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch

from minilora.quant.nf4 import DYNAMIC_MAP, NF4_LEVELS, NF4State, check_state, nf4_dequantize

from .dispatch import TRITON_KERNELS, pick, triton, triton_launch_options

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _nf4_dequant_kernel(
        # Pointers
        packed_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, levels_ptr, out_ptr,
        # Sizes and the double-quant offset
        n_elements, offset,
        # Meta-parameters
        QUANT_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # element indices of this program
        mask = offs < n_elements
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)  # packed[i // 2]
        code = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)  # high nibble first
        level = tl.load(levels_ptr + code, mask=mask, other=0.0)  # NF4_LEVELS[code]
        block = offs // QUANT_BLOCK
        if DOUBLE_QUANT:  # absmax = DYNAMIC_MAP[q] × absmax2[block // 256] + offset
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(dynamic_map_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (level * scale).to(out_ptr.dtype.element_ty), mask=mask)  # one rounding

    def nf4_dequant_triton(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Checks, allocates, launches."""
        dtype = dtype or state.dtype
        check_state(packed, state)
        device = packed.device
        out = torch.empty(state.shape, dtype=dtype, device=device)
        n, block = state.numel, 1024
        dq = state.double_quant
        _nf4_dequant_kernel[(triton.cdiv(n, block),)](
            packed, state.absmax, state.absmax2 if dq else state.absmax, DYNAMIC_MAP.to(device), NF4_LEVELS.to(device), out,
            n, float(state.offset) if dq else 0.0,
            QUANT_BLOCK=state.blocksize, DOUBLE_QUANT=dq, BLOCK=block, **triton_launch_options(),
        )
        return out

    TRITON_KERNELS["nf4_dequant"] = nf4_dequant_triton


def nf4_dequant_reference(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain PyTorch: unpack, look up the levels, scale per block."""
    return nf4_dequantize(packed, state, dtype)


def nf4_dequant(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None,
                backend: str = "auto") -> torch.Tensor:
    """The dense weight W_hat (state.shape, dtype): Triton on CUDA when available, else the reference."""
    if pick("nf4_dequant", backend, packed) == "triton":
        return TRITON_KERNELS["nf4_dequant"](packed, state, dtype)
    return nf4_dequant_reference(packed, state, dtype)
