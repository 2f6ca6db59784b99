r"""# Exercise 4: merging and unmerging an adapter

*Chapter 4 of the tutorial (`docs/tutorial.md`, "Merging for deployment").*

For a layer $y = x W^\top + b$ with $W \in \mathbb{R}^{d_{out} \times d_{in}}$, the adapter's change is
$x \,(s\,BA)^\top$, so it folds into the weight:

$$ W' = W + \Delta W, \qquad \Delta W = s\, B A \in \mathbb{R}^{d_{out} \times d_{in}}, \quad s = \alpha / r. $$

After merging, inference costs exactly what the base costs. Unmerging subtracts $\Delta W$ again;
in floating point $(W + \Delta W) - \Delta W$ is $W$ up to a rounding or two, not always bit for bit.

**GPT-2's Conv1D** stores its weight transposed, $W_{c} \in \mathbb{R}^{d_{in} \times d_{out}}$, and
computes $y = x W_c + b$. Output column $j$ of the layer is **column** $j$ of $W_c$, so the change
of output columns $[f, e)$ (one slice of a fused $[q|k|v]$ layer) goes into
$W_c[:, f{:}e] \mathrel{+}= (s\,BA)^\top$, and every other column (K's) stays exactly as it was.

## Your task

1. `delta_weight(A, B, scaling)`: $\Delta W = s\,BA$, shape (d_out, d_in), computed in fp32.
2. `merge_conv1d(W, A, B, scaling, first, end)`: a new tensor, $W_c$ with $(s\,BA)^\top$ added to
   columns `first:end` (the slice the pair writes), in $W_c$'s dtype.
3. `unmerge_conv1d(W, A, B, scaling, first, end)`: the inverse, subtracting it.

Do not modify `W` in place: return new tensors. The tests compare with minilora's
`merge_adapter()` / `unmerge_adapter()` on a GPT-2 with LoRA on Q and V.

Run: `pytest docs/exercises/test_ex04_merge.py`
"""

import torch


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A in fp32: (d_out, r) @ (r, d_in) -> (d_out, d_in)."""
    return scaling * (B.float() @ A.float())


def merge_conv1d(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, first: int,
                 end: int) -> torch.Tensor:
    """W (d_in, d_out) of a Conv1D with the pair's ΔWᵀ added to columns [first, end)."""
    merged = W.clone()
    merged[:, first:end] = (W[:, first:end].float() + delta_weight(A, B, scaling).T).to(W.dtype)
    return merged


def unmerge_conv1d(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, first: int,
                   end: int) -> torch.Tensor:
    """The inverse of merge_conv1d: ΔWᵀ subtracted from columns [first, end)."""
    restored = W.clone()
    restored[:, first:end] = (W[:, first:end].float() - delta_weight(A, B, scaling).T).to(W.dtype)
    return restored
