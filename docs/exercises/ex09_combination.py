r"""# Exercise 9: combining adapters, `cat` and `linear`

*Chapter 8 of the tutorial (`docs/tutorial.md`, "Many adapters").*

Adapter $i$ changes a weight by $\Delta W_i = s_i B_i A_i$ ($s_i = \alpha_i / r_i$). A weighted
combination with weights $w_i$ wants

$$ \Delta W = \sum_i w_i\, s_i\, B_i A_i . $$

**`cat` (exact).** Stack the factors: the sum is itself one LoRA of rank $\sum_i r_i$, scale 1,

$$ A = \begin{bmatrix} A_1 \\ A_2 \\ \vdots \end{bmatrix}, \qquad
   B = \begin{bmatrix} w_1 s_1 B_1 & w_2 s_2 B_2 & \cdots \end{bmatrix}, \qquad
   B A = \sum_i w_i s_i B_i A_i . $$

**`linear` (PEFT's, approximate).** Keep the rank (all adapters need the same $r$) and add the
factors, with $c_i = w_i s_i$:

$$ A = \sum_i \operatorname{sign}(c_i) \sqrt{|c_i|}\, A_i, \qquad B = \sum_i \sqrt{|c_i|}\, B_i, $$

again with scale 1. Expanding $BA$ gives the wanted $\sum_i c_i B_i A_i$ plus cross terms
$\operatorname{sign}(c_j)\sqrt{|c_i c_j|}\, B_i A_j$ ($i \ne j$) that nobody asked for. A negative
weight subtracts an adapter ("task arithmetic").

## Your task

Each adapter is given as a tuple `(A, B, scale)`, `A` (r_i, d_in), `B` (d_out, r_i).

1. `cat_combination(adapters, weights)`: `(A, B)` of the `cat` adapter (scale 1).
2. `linear_combination(adapters, weights)`: `(A, B)` of the `linear` adapter (scale 1).

The tests compare your factors and their $BA$ with those `add_weighted_adapter(...,
combination_type="cat" / "linear")` gives minilora's adapters.

Run: `pytest docs/exercises/test_ex09_combination.py`
"""

import math

import torch


def cat_combination(adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
                    weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_1; A_2; …] (Σr, d_in), B = [w_1 s_1 B_1 | w_2 s_2 B_2 | …] (d_out, Σr)."""
    raise NotImplementedError("torch.cat the A's along dim 0 and the scaled B's along dim 1")


def linear_combination(adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
                       weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Σ sign(c_i) √|c_i| A_i, B = Σ √|c_i| B_i with c_i = w_i s_i; every adapter of one rank."""
    raise NotImplementedError(
        "c_i = w_i · s_i; math.copysign(math.sqrt(abs(c_i)), c_i) weighs A_i, math.sqrt(abs(c_i)) B_i")
