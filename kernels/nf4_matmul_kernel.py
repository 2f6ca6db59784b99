"""The nf4_matmul kernels: y = x · dequant(W)ᵀ, and its input gradient x_grad = y_grad · dequant(W).

Shapes (W is stored (N, K), row-major, as nn.Linear's weight; element (n, k) is code number n·K + k):
    x       (..., K)  fp32 / fp16 / bf16; products accumulate in fp32
    packed  uint8 [(N·K+1)//2], state.shape == (N, K)
    y       (..., N)

The Triton kernels never build W: each program loads a (BLOCK_N, BLOCK_K) tile of 4-bit codes,
expands it in registers (nibble → NF4 level × its block's absmax, rebuilt from the double-quant
codes on the fly) and feeds it to tl.dot, masking the edges of M, N and K. The backward kernel
reads the same tiles in the transposed pattern. The torch reference dequantizes W for the product
and drops it straight after: nothing dense is kept between forward and backward.

Two regimes share one kernel through its tile shapes, chosen by `_tiles` from M alone (no
autotuning): M ≤ 16 (decoding: a GEMV in disguise) takes one fixed config with wide 128 × 128
weight tiles, so the 4-bit weight stream keeps memory bandwidth busy; larger M (training) takes
one fixed config of 128 × 128 × 64 GEMM tiles. Under the interpreter one small config runs.

The public, dispatching, differentiable `nf4_matmul` and `nf4_matmul_grad_input` are the custom
ops in ops.py; this file holds the kernels and their references.
"""

from __future__ import annotations

import torch

from minilora.quant.nf4_format import NF4State, check_state

from .dispatch import TRITON_KERNELS, interpreting, triton, triton_launch_options
from .nf4_dequantize_kernel import nf4_dequantize_reference


def _check(x: torch.Tensor, state: NF4State, last: int, name: str) -> None:
    if len(state.shape) != 2:
        raise ValueError(f"{name}: the quantized weight must be 2-D (N, K), got shape {tuple(state.shape)}")
    if x.shape[-1] != last:
        raise ValueError(f"{name}: x has {x.shape[-1]} features in its last dimension, the weight expects {last}")


def nf4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """(..., K) @ (K, N) -> (..., N), with W dequantized to x's dtype."""
    _check(x, state, state.shape[1], "nf4_matmul")
    return x @ nf4_dequantize_reference(packed, state, x.dtype).t()


def nf4_matmul_grad_input_reference(grad_y: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """(..., N) @ (N, K) -> (..., K): the input gradient of y = x · Wᵀ."""
    _check(grad_y, state, state.shape[0], "nf4_matmul_grad_input")
    return grad_y @ nf4_dequantize_reference(packed, state, grad_y.dtype)


if triton is not None:
    import triton.language as tl

    from .nf4_dequantize_kernel import block_scale, weight_args

    @triton.jit
    def _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, levels_ptr, offset, rn, rk, N, K,
                     QUANT_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """W[rn, rk] in fp32, (len(rn), len(rk)), zero outside N × K: dequantized in registers."""
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        idx = rn[:, None].to(tl.int64) * K + rk[None, :]  # flat code index n·K + k
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
        level = tl.load(levels_ptr + code, mask=mask, other=0.0)
        scale = block_scale(absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset, idx // QUANT_BLOCK, mask, DOUBLE_QUANT)
        return level * scale

    @triton.jit
    def _nf4_matmul_kernel(
        # Pointers
        x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, levels_ptr, y_ptr,
        # Matrix dimensions and the double-quant offset
        M, N, K, offset,
        # Strides
        stride_xm, stride_xk, stride_ym, stride_yn,
        # Meta-parameters
        QUANT_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y (M, N) = x (M, K) · Wᵀ, W (N, K) in NF4."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            w = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, levels_ptr, offset, rn, rk, N, K,
                             QUANT_BLOCK, DOUBLE_QUANT)  # (BLOCK_N, BLOCK_K)
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))  # x · Wᵀ, fp32 accumulation
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _nf4_matmul_grad_input_kernel(
        # Pointers
        g_ptr, packed_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, levels_ptr, dx_ptr,
        # Matrix dimensions and the double-quant offset
        M, N, K, offset,
        # Strides
        stride_gm, stride_gn, stride_dm, stride_dk,
        # Meta-parameters
        QUANT_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dx (M, K) = g (M, N) · W, W (N, K) in NF4: the same tiles, read along N."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # (BLOCK_M, BLOCK_N)
            w = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, levels_ptr, offset, rn, rk, N, K,
                             QUANT_BLOCK, DOUBLE_QUANT)  # (BLOCK_N, BLOCK_K)
            acc += tl.dot(g, w.to(g.dtype))
        tl.store(dx_ptr + rm[:, None] * stride_dm + rk[None, :] * stride_dk, acc.to(dx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))

    def _tiles(M: int) -> dict:
        """Tile shapes: one small config under the interpreter; decode vs training shapes on a GPU."""
        if interpreting():
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
        if M <= 16:  # decoding: few rows, wide weight tiles stream the 4-bit weights
            return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)  # GEMM tiles (Ampere/Hopper)

    def _launch(kernel, a: torch.Tensor, packed: torch.Tensor, state: NF4State, grad: bool) -> torch.Tensor:
        """Checks, allocates, launches one of the two kernels on a (..., in) -> (..., out), where
        (in, out) is (K, N) for the forward product and (N, K) for the input gradient."""
        N, K = state.shape
        d_in, d_out = (N, K) if grad else (K, N)
        _check(a, state, d_in, "nf4_matmul_grad_input" if grad else "nf4_matmul")
        check_state(packed, state)
        a2 = a.reshape(-1, d_in)  # (M, in)
        M = a2.shape[0]
        out = torch.empty(M, d_out, dtype=a.dtype, device=a.device)  # (M, out)
        tiles = _tiles(M)
        grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(d_out, tiles["BLOCK_K" if grad else "BLOCK_N"]))
        pointers, offset = weight_args(packed, state)
        kernel[grid](a2, *pointers, out, M, N, K, offset,
                     a2.stride(0), a2.stride(1), out.stride(0), out.stride(1),
                     QUANT_BLOCK=state.blocksize, DOUBLE_QUANT=state.double_quant, **tiles, **triton_launch_options())
        return out.view(*a.shape[:-1], d_out)

    def nf4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
        """y = x · dequant(W)ᵀ."""
        return _launch(_nf4_matmul_kernel, x, packed, state, grad=False)

    def nf4_matmul_grad_input_triton(grad_y: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
        """x_grad = y_grad · dequant(W)."""
        return _launch(_nf4_matmul_grad_input_kernel, grad_y, packed, state, grad=True)

    TRITON_KERNELS["nf4_matmul"] = nf4_matmul_triton
    TRITON_KERNELS["nf4_matmul_grad_input"] = nf4_matmul_grad_input_triton

