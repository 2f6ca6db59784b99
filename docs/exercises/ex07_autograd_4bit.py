r"""# Exercise 7: a gradient through a frozen 4-bit weight

*Chapter 6 of the tutorial (`docs/tutorial.md`, "Gradients through a frozen 4-bit weight").*

In QLoRA the base weight is stored in NF4 and never trains, yet the gradient must flow *through* it
to the adapters of the layers below. For $y = x\,\hat W^\top$ with $\hat W = \mathrm{dequant}(W_{nf4})$
($d_{out} \times d_{in}$) and a loss $L$:

$$ \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\, \hat W, \qquad
   \text{no gradient for } W_{nf4} \text{ (codes are integers, and frozen).} $$

Autograd would keep the dense $\hat W$ alive between the forward and the backward pass (it is an
input of the matmul), which is exactly the memory 4 bits were meant to save. A custom
`torch.autograd.Function` keeps only the packed codes and rebuilds $\hat W$ in the backward pass.

For the adapter on top, $y = \ldots + s\,(x A^\top) B^\top$ with $h = x A^\top$ and
$G = \partial L / \partial y$ (rows are tokens):

$$ \frac{\partial L}{\partial B} = s\, G^\top h, \qquad
   \frac{\partial L}{\partial A} = s\, (G B)^\top x. $$

## Your task

1. `NF4Matmul`, a `torch.autograd.Function`:
   - `forward(ctx, x, packed, state)`: dequantize with
     `minilora.quant.nf4_dequantize(packed, state, x.dtype)` and return $x \hat W^\top$; keep
     `packed` (`ctx.save_for_backward`) and `state` (an attribute of `ctx`), **not** $\hat W$.
   - `backward(ctx, grad_y)`: dequantize again, return $\partial L/\partial x$ and `None` for
     `packed` and `state`.
2. `lora_grads(x, grad_y, A, B, scaling)`: $(\partial L/\partial A,\ \partial L/\partial B)$ for 2-D
   `x` (N, d_in) and `grad_y` (N, d_out), by the formulas above.

The tests run `torch.autograd.gradcheck` on your Function in float64, compare it with minilora's
`Linear4bit`, check that it saves no dense weight, and compare `lora_grads` with the gradients
autograd gives minilora's QLoRA layer.

Run: `pytest docs/exercises/test_ex07_autograd_4bit.py`
"""

import torch

from minilora.quant import NF4State, nf4_dequantize


class NF4Matmul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ; the backward rebuilds dequant(W) from the packed codes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
        raise NotImplementedError(
            "dequantize in x's dtype and multiply; save for the backward only the packed codes "
            "(ctx.save_for_backward) and the state (an attribute of ctx)")

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        raise NotImplementedError("rebuild the weight from ctx.saved_tensors; one gradient per forward input")


def lora_grads(x: torch.Tensor, grad_y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂A (r, d_in), ∂L/∂B (d_out, r)) of y = … + s (x Aᵀ) Bᵀ, x (N, d_in), grad_y (N, d_out)."""
    raise NotImplementedError(
        "the two formulas of the task, with h = x Aᵀ; check the shapes: (r, d_in) and (d_out, r)")
