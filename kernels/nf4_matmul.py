"""nf4_matmul: y = x · dequant(W)ᵀ, and its input gradient x_grad = y_grad · dequant(W).

Shapes (W is stored (N, K), row-major, as nn.Linear's weight):
    x       (..., K)  any float dtype; the product is computed in x's dtype with fp32 accumulation
    packed  uint8 [(N·K+1)//2], state.shape == (N, K)
    y       (..., N)

The torch reference dequantizes W for the product and drops it straight after: nothing dense is
kept between forward and backward. The Triton kernel (when present) never builds W at all: tiles
of codes are expanded in registers and fed to tl.dot.
"""

from __future__ import annotations

import torch

from minilora.quant.nf4 import NF4State

from .dispatch import TRITON_KERNELS, pick
from .nf4_dequant import nf4_dequant_reference


def _check(x: torch.Tensor, state: NF4State, last: int, name: str) -> None:
    if len(state.shape) != 2:
        raise ValueError(f"{name}: the quantized weight must be 2-D (N, K), got shape {tuple(state.shape)}")
    if x.shape[-1] != last:
        raise ValueError(f"{name}: x has {x.shape[-1]} features in its last dimension, the weight expects {last}")


def nf4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """(..., K) @ (K, N) -> (..., N), with W dequantized to x's dtype."""
    _check(x, state, state.shape[1], "nf4_matmul")
    return x @ nf4_dequant_reference(packed, state, x.dtype).t()


def nf4_matmul_grad_input_reference(grad_y: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """(..., N) @ (N, K) -> (..., K): the input gradient of y = x · Wᵀ."""
    _check(grad_y, state, state.shape[0], "nf4_matmul_grad_input")
    return grad_y @ nf4_dequant_reference(packed, state, grad_y.dtype)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state: NF4State, backend: str = "auto") -> torch.Tensor:
    """y = x · dequant(W)ᵀ."""
    if pick("nf4_matmul", backend, x) == "triton":
        return TRITON_KERNELS["nf4_matmul"](x, packed, state)
    return nf4_matmul_reference(x, packed, state)


def nf4_matmul_grad_input(grad_y: torch.Tensor, packed: torch.Tensor, state: NF4State, backend: str = "auto") -> torch.Tensor:
    """x_grad = y_grad · dequant(W)."""
    if pick("nf4_matmul_grad_input", backend, grad_y) == "triton":
        return TRITON_KERNELS["nf4_matmul_grad_input"](grad_y, packed, state)
    return nf4_matmul_grad_input_reference(grad_y, packed, state)
