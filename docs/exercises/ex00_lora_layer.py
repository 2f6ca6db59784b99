r"""# Exercise 0: a LoRA layer in plain PyTorch

*Chapter 0 of the course (`docs/lora-in-20-lines.md`).*

A linear layer computes $y = x W^\top + b$ with $W \in \mathbb{R}^{d_{out} \times d_{in}}$.
LoRA freezes $W$ and $b$ and learns a low-rank change of the weight,

$$ y = x W^\top + b + \frac{\alpha}{r}\,(x A^\top) B^\top, \qquad
   A \in \mathbb{R}^{r \times d_{in}},\ B \in \mathbb{R}^{d_{out} \times r}. $$

- $A$ starts random, as PEFT draws it: `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, which is
  uniform on $[-1/\sqrt{d_{in}},\ 1/\sqrt{d_{in}}]$.
- $B$ starts at **zero**, so a fresh layer's output is the base layer's output, bit for bit
  (adding an exact zero changes no floating-point number).
- The scale is $\alpha / r$.

## Your task

1. `LoRALinear(base, r, alpha)`: an `nn.Module` holding the frozen `base` (`self.base`, its
   parameters with `requires_grad=False`), two trainable `nn.Parameter`s `self.A` (r, d_in) and
   `self.B` (d_out, r) in the base weight's dtype and device, and the float `self.scaling`.
   `forward(x)` returns the formula above for any leading shape of `x`.
2. `wrap_attention(model, r, alpha, targets)`: freeze every parameter of `model`, then replace
   each `nn.Linear` whose name ends with one of `targets` (`"q_proj"`, `"v_proj"`) by a
   `LoRALinear` around it, in place. Return the replaced modules' names, in `named_modules()` order.

The tests check that a fresh layer is the base bit for bit, that $A$ is drawn like PEFT's, and that
a wrapped model computes what `minilora.get_peft_model` computes once both hold the same $A$ and $B$.

Run: `pytest docs/exercises/test_ex00_lora_layer.py`
"""

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (α/r)·B·A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        raise NotImplementedError(
            "keep `base` as self.base and freeze its parameters; make self.A (r, d_in) with "
            "nn.init.kaiming_uniform_(a=math.sqrt(5)) and self.B (d_out, r) of zeros, both nn.Parameter in "
            "base.weight's dtype and device; self.scaling = alpha / r")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the base layer's output plus self.scaling · (x Aᵀ) Bᵀ")


def wrap_attention(model: nn.Module, r: int, alpha: float, targets=("q_proj", "v_proj")) -> list[str]:
    """Freeze `model` and put a LoRALinear around each nn.Linear whose name ends with a target."""
    raise NotImplementedError(
        "freeze all of model.parameters(); collect the names first (list(model.named_modules())), then "
        "setattr(model.get_submodule(parent), child, LoRALinear(...)) for each")
