"""The nf4_dequant kernel: packed NF4 codes + (double-quantized) block scales -> a dense weight, in one pass.

Inputs (storage format in minilora/quant/nf4_format.py):
    packed  uint8 [(n+1)//2]    two 4-bit codes per byte, first element in the high nibble
    state   NF4State            absmax fp32 [n_blocks], or (double quant) uint8 codes into the
                                256-entry dynamic map + absmax2 fp32 [n_blocks/SCALE_BLOCK] + offset fp32
Output:
    W_hat   dtype, state.shape  NF4_LEVELS[code] × absmax[block], in fp32, rounded once to dtype

The Triton kernel rebuilds each block's absmax (code8 → dynamic map → × absmax2 + offset, in
`block_scale`, which nf4_matmul's kernels share) and the NF4 values in the same pass; the torch
reference below is its test oracle and the CPU path. The public, dispatching `nf4_dequantize` is the
custom op in ops.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from minilora.quant.nf4_format import DYNAMIC_MAP, NF4_LEVELS, SCALE_BLOCK, NF4State, check_state

from . import native
from .dispatch import TRITON_KERNELS, triton, triton_launch_options

if triton is not None:
    import triton.language as tl

    _SCALE_BLOCK = tl.constexpr(SCALE_BLOCK)

    @triton.jit
    def block_scale(absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset, block, mask, DOUBLE_QUANT: tl.constexpr):
        """absmax[block] in fp32, same shape as `block`: stored as is, or (double quant) rebuilt
        from its 8-bit code q as DYNAMIC_MAP[q] × absmax2[block // SCALE_BLOCK] + offset."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(dynamic_map_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // _SCALE_BLOCK, mask=mask, other=0.0)
            scale = scale + offset  # two roundings, as the torch reference
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return scale

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
        scale = block_scale(absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset, offs // QUANT_BLOCK, mask, DOUBLE_QUANT)
        tl.store(out_ptr + offs, (level * scale).to(out_ptr.dtype.element_ty), mask=mask)  # one rounding

    def weight_args(packed: torch.Tensor, state: NF4State) -> tuple[tuple, float]:
        """The kernels' weight pointers (packed, absmax, absmax2, dynamic map, levels) and the
        double-quant offset as a float; without double quant absmax2 is a dummy, never read."""
        dq, device = state.double_quant, packed.device
        pointers = (packed, state.absmax, state.absmax2 if dq else state.absmax, DYNAMIC_MAP.to(device),
                    NF4_LEVELS.to(device))
        return pointers, float(state.offset) if dq else 0.0

    def nf4_dequant_triton(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Checks, allocates, launches."""
        check_state(packed, state)
        out = torch.empty(state.shape, dtype=dtype or state.dtype, device=packed.device)
        n, block = state.numel, 1024
        pointers, offset = weight_args(packed, state)
        _nf4_dequant_kernel[(triton.cdiv(n, block),)](
            *pointers, out, n, offset,
            QUANT_BLOCK=state.blocksize, DOUBLE_QUANT=state.double_quant, BLOCK=block, **triton_launch_options(),
        )
        return out

    TRITON_KERNELS["nf4_dequant"] = nf4_dequant_triton


def nf4_dequantize_reference(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain PyTorch (unpack, look up the levels, scale per block), or the native CPU loop for
    large CPU tensors: the same values."""
    check_state(packed, state)
    return native.dequantize(packed, state, dtype or state.dtype)

