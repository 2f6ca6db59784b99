r"""# Exercise 1: the scale α/r, and rsLoRA's α/√r

*Chapter 1 of the tutorial (`docs/tutorial.md`, "Low-rank updates").*

LoRA adds $s \cdot (x A^\top) B^\top$ with the scale $s = \alpha / r$. rsLoRA (Kalajdzievski, 2023)
uses $s = \alpha / \sqrt{r}$ instead.

**Why it matters.** Once training has moved $B$ away from zero, the entries of $A$ and $B$ are of
some size that does not depend much on $r$. The update $h = (x A^\top) B^\top$ is a sum of $r$
terms, one per rank:
$h_j = \sum_{k=1}^{r} (x \cdot A_k)\, B_{jk}$. Terms of random sign add up like a random walk, so
$\lVert h \rVert$ grows like $\sqrt{r}$. Then

- with $s = \alpha/r$ the update's size goes like $\sqrt{r} / r = 1/\sqrt{r}$: a larger rank learns
  *less*, which is why large ranks looked useless with plain LoRA;
- with $s = \alpha/\sqrt{r}$ it stays the same whatever $r$ ("rank-stabilized").

**Keeping the scale when r changes.** Exporting a LoRA at another rank (minilora writes its Q and V
slices as one LoRA of rank $2r$) keeps the output only if $s$ is unchanged, so $\alpha$ must change
with $r$: $\alpha' = \alpha \cdot r'/r$ for LoRA, $\alpha' = \alpha \sqrt{r'/r}$ for rsLoRA.

## Your task

1. `lora_scaling(alpha, r, rslora=False)`: the scale $s$.
2. `update_rms(A, B, x, scale)`: the root-mean-square of the entries of $s \cdot (x A^\top) B^\top$,
   as a Python float ($\sqrt{\mathrm{mean}(h^2)}$).
3. `alpha_for_rank(alpha, r, new_r, rslora=False)`: the $\alpha'$ that gives rank `new_r` the same
   scale as (`alpha`, `r`).

The tests compare your scale with minilora's layers (`layer.scaling`) and measure the update's size
for r = 4 … 256 with both scales.

Run: `pytest docs/exercises/test_ex01_scaling.py`
"""

import math

import torch


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def update_rms(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor, scale: float) -> float:
    """RMS of scale · (x Aᵀ) Bᵀ; A (r, d_in), B (d_out, r), x (n, d_in)."""
    h = scale * ((x @ A.T) @ B.T)  # (n, d_out)
    return h.square().mean().sqrt().item()


def alpha_for_rank(alpha: float, r: int, new_r: int, rslora: bool = False) -> float:
    """The alpha at rank new_r with the same scale as (alpha, r)."""
    return alpha * math.sqrt(new_r / r) if rslora else alpha * new_r / r
