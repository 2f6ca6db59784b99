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
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_out, d_in = base.weight.shape
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.A = nn.Parameter(torch.empty(r, d_in, **like))  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, r, **like))  # (d_out, r): zero, so the layer starts as the base
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's draw: uniform on ±1/√d_in
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.A.T) @ self.B.T)  # (..., d_out)


def wrap_attention(model: nn.Module, r: int, alpha: float, targets=("q_proj", "v_proj")) -> list[str]:
    """Freeze `model` and put a LoRALinear around each nn.Linear whose name ends with a target."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.split(".")[-1] in targets]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha))
    return names
