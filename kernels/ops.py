"""The NF4 operations as PyTorch custom ops: torch.compile sees each as one node that it traces,
differentiates and keeps inside a single graph.

    minilora::nf4_dequant(packed, absmax, absmax2, offset, shape, blocksize, dtype, backend)       -> W_hat
    minilora::nf4_matmul(x, packed, absmax, absmax2, offset, shape, blocksize, backend)            -> y
    minilora::nf4_matmul_grad_input(g, packed, absmax, absmax2, offset, shape, blocksize, backend) -> dx

Shapes: W_hat (N, K) in `dtype`; x (..., K) -> y (..., N); g (..., N) -> dx (..., K), in the
input's dtype. Custom ops take tensors and primitives only, so an NF4State travels unpacked:
absmax, absmax2 and offset (both None without double quant: that is how the ops tell),
shape = [N, K] and blocksize. Each op's body picks, on the real tensors, the Triton kernel or
the torch reference (dispatch.py); its fake implementation only states the output's shape and
dtype, which is all that tracing needs.

Autograd. W = dequant(packed, scales) is frozen (QLoRA trains no base weight): no gradient goes to
the codes or the scales. Both products are linear in their one differentiable input,

    y  = x · Wᵀ      ∂L/∂x = ∂L/∂y · W     = nf4_matmul_grad_input(∂L/∂y)
    dx = g · W       ∂L/∂g = ∂L/∂dx · Wᵀ   = nf4_matmul(∂L/∂dx)

so each op's backward is the other op (double backward works as well), and only the 4-bit codes
and scales are saved between the passes: the backward dequantizes W again, tile by tile in the
Triton kernel, for the one product in the torch reference.

`nf4_dequantize`, `nf4_matmul` and `nf4_matmul_grad_input` at the bottom are the public functions,
taking an NF4State as before.
"""

from typing import Optional

import torch
from torch import Tensor

from minilora.quant.nf4_format import NF4State

from .dispatch import implementation
from .nf4_dequantize_kernel import nf4_dequantize_reference
from .nf4_matmul_kernel import nf4_matmul_grad_input_reference, nf4_matmul_reference


def _state(absmax: Tensor, absmax2: Optional[Tensor], offset: Optional[Tensor], shape: list[int], blocksize: int,
           dtype: torch.dtype) -> NF4State:
    return NF4State(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                    double_quant=absmax2 is not None, absmax2=absmax2, offset=offset)


def state_args(state: NF4State) -> tuple:
    """An NF4State as the ops' arguments: (absmax, absmax2, offset, shape, blocksize)."""
    if state.double_quant and (state.absmax2 is None or state.offset is None):
        raise ValueError("a double-quant NF4State needs absmax2 and offset: pass the state nf4_quantize returned")
    dq = state.double_quant
    return state.absmax, state.absmax2 if dq else None, state.offset if dq else None, list(state.shape), state.blocksize


@torch.library.custom_op("minilora::nf4_dequant", mutates_args=())
def nf4_dequant_op(packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], offset: Optional[Tensor],
                   shape: list[int], blocksize: int, dtype: torch.dtype, backend: str) -> Tensor:
    """W_hat (shape) in dtype."""
    state = _state(absmax, absmax2, offset, shape, blocksize, dtype)
    return implementation("nf4_dequant", backend, packed, nf4_dequantize_reference)(packed, state, dtype)


@torch.library.custom_op("minilora::nf4_matmul", mutates_args=())
def nf4_matmul_op(x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], offset: Optional[Tensor],
                  shape: list[int], blocksize: int, backend: str) -> Tensor:
    """(..., K) @ (K, N) -> (..., N)."""
    state = _state(absmax, absmax2, offset, shape, blocksize, x.dtype)
    return implementation("nf4_matmul", backend, x, nf4_matmul_reference)(x, packed, state)


@torch.library.custom_op("minilora::nf4_matmul_grad_input", mutates_args=())
def nf4_matmul_grad_input_op(grad_y: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                             offset: Optional[Tensor], shape: list[int], blocksize: int, backend: str) -> Tensor:
    """(..., N) @ (N, K) -> (..., K)."""
    state = _state(absmax, absmax2, offset, shape, blocksize, grad_y.dtype)
    return implementation("nf4_matmul_grad_input", backend, grad_y, nf4_matmul_grad_input_reference)(grad_y, packed, state)


@nf4_dequant_op.register_fake
def _(packed, absmax, absmax2, offset, shape, blocksize, dtype, backend):
    return packed.new_empty(shape, dtype=dtype)


@nf4_matmul_op.register_fake
def _(x, packed, absmax, absmax2, offset, shape, blocksize, backend):
    return x.new_empty(*x.shape[:-1], shape[0])  # (..., N)


@nf4_matmul_grad_input_op.register_fake
def _(grad_y, packed, absmax, absmax2, offset, shape, blocksize, backend):
    return grad_y.new_empty(*grad_y.shape[:-1], shape[1])  # (..., K)


def _save_weight(ctx, inputs, output) -> None:
    """Keep the 4-bit codes and scales (never a dense W) for the backward."""
    _, packed, absmax, absmax2, offset, shape, blocksize, backend = inputs
    ctx.save_for_backward(packed, absmax, absmax2, offset)
    ctx.weight_args = (shape, blocksize, backend)


def _saved_weight(ctx) -> tuple:
    return (*ctx.saved_tensors, *ctx.weight_args)  # packed, absmax, absmax2, offset, shape, blocksize, backend


def _matmul_backward(ctx, grad_y):
    """∂L/∂x = ∂L/∂y · W; the frozen weight's arguments get None."""
    return (nf4_matmul_grad_input_op(grad_y, *_saved_weight(ctx)),) + (None,) * 7


def _grad_input_backward(ctx, grad_dx):
    """∂L/∂g = ∂L/∂dx · Wᵀ; the frozen weight's arguments get None."""
    return (nf4_matmul_op(grad_dx, *_saved_weight(ctx)),) + (None,) * 7


nf4_matmul_op.register_autograd(_matmul_backward, setup_context=_save_weight)
nf4_matmul_grad_input_op.register_autograd(_grad_input_backward, setup_context=_save_weight)


def nf4_dequantize(packed: Tensor, state: NF4State, dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """The dense weight W_hat (state.shape, dtype or state.dtype): Triton on CUDA when available, else the reference."""
    return nf4_dequant_op(packed, *state_args(state), dtype or state.dtype, backend)


def nf4_matmul(x: Tensor, packed: Tensor, state: NF4State, backend: str = "auto") -> Tensor:
    """y = x · dequant(W)ᵀ, (..., K) -> (..., N); differentiable in x."""
    return nf4_matmul_op(x, packed, *state_args(state), backend)


def nf4_matmul_grad_input(grad_y: Tensor, packed: Tensor, state: NF4State, backend: str = "auto") -> Tensor:
    """x_grad = y_grad · dequant(W), (..., N) -> (..., K); differentiable in grad_y."""
    return nf4_matmul_grad_input_op(grad_y, packed, *state_args(state), backend)
