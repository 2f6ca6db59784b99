r"""# Exercise 3: LoRA on the Q and V slices of a fused QKV projection

*Chapter 3 of the tutorial (`docs/tutorial.md`, "Attention, and the fused QKV slices").*

GPT-2 computes queries, keys and values with one layer, `c_attn`, a `Conv1D` whose weight is stored
transposed, $W \in \mathbb{R}^{d \times 3d}$ (in, out): $y = x W + b = [\,q \mid k \mid v\,]$,
columns $[0, d)$, $[d, 2d)$ and $[2d, 3d)$.

LoRA on Q and V only adds one pair per slice and leaves K's columns alone, bit for bit:

$$ q = x W_{:,0:d} + b_{0:d} + s\,(x A_q^\top) B_q^\top, \qquad
   k = x W_{:,d:2d} + b_{d:2d}, \qquad
   v = x W_{:,2d:3d} + b_{2d:3d} + s\,(x A_v^\top) B_v^\top, $$

with $A_q, A_v \in \mathbb{R}^{r \times d}$, $B_q, B_v \in \mathbb{R}^{d \times r}$, $s = \alpha/r$.

**One LoRA for PEFT.** PEFT has no slices; the same change is one LoRA of rank $2r$ over the whole
of `c_attn`:

$$ A = \begin{bmatrix} A_q \\ A_v \end{bmatrix} \in \mathbb{R}^{2r \times d}, \qquad
   B = \begin{bmatrix} B_q & 0 \\ 0 & 0 \\ 0 & B_v \end{bmatrix} \in \mathbb{R}^{3d \times 2r}, $$

(K's rows of $B$ are zero), and since the rank doubled, $\alpha$ doubles too, so that $\alpha/r$
and the output are unchanged.

## Your task

1. `qv_lora_forward(base, x, A_q, B_q, A_v, B_v, scaling)`: the layer's output $[q|k|v]$ for
   `x` (..., d). Compute the base part with `base(x)` itself, so that K's columns are exactly the
   base layer's; add the updates to the Q and V columns only (out of place: no `+=` on a view of
   a tensor autograd needs).
2. `as_one_lora(A_q, B_q, A_v, B_v, r, alpha)`: PEFT's single LoRA, `(A, B, new_r, new_alpha)`.

The tests compare with minilora's `c_attn` under `LoraConfig(target_modules=["q", "v"])` and with
the adapter minilora saves for PEFT.

Run: `pytest docs/exercises/test_ex03_fused_qkv.py`
"""

import torch
import torch.nn as nn


def qv_lora_forward(base: nn.Module, x: torch.Tensor, A_q: torch.Tensor, B_q: torch.Tensor,
                    A_v: torch.Tensor, B_v: torch.Tensor, scaling: float) -> torch.Tensor:
    """[q | k | v] of a fused Conv1D with LoRA on the Q and V columns."""
    y = base(x)  # (..., 3d)
    d = y.shape[-1] // 3
    q = y[..., :d] + scaling * ((x @ A_q.T) @ B_q.T)
    v = y[..., 2 * d:] + scaling * ((x @ A_v.T) @ B_v.T)
    return torch.cat([q, y[..., d:2 * d], v], dim=-1)


def as_one_lora(A_q: torch.Tensor, B_q: torch.Tensor, A_v: torch.Tensor, B_v: torch.Tensor, r: int,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The Q and V pairs as one LoRA of rank 2r over all 3d columns: (A, B, 2r, 2α)."""
    d = B_q.shape[0]
    A = torch.cat([A_q, A_v])  # (2r, d)
    B = torch.zeros(3 * d, 2 * r, dtype=B_q.dtype)  # (3d, 2r): K's rows stay zero
    B[:d, :r] = B_q
    B[2 * d:, r:] = B_v
    return A, B, 2 * r, 2 * alpha
