r"""Task-vector merging: TIES, DARE and magnitude pruning, with PEFT's names and semantics.

Each method takes n task tensors τᵢ (all one shape) and weights wᵢ and returns one tensor:

    magnitude_prune   τ = Σᵢ wᵢ · top_k(τᵢ)
    dare_linear       τ = Σᵢ wᵢ · (mᵢ ⊙ τᵢ) / d,        mᵢ ~ Bernoulli(d) per entry
    ties              τ̂ᵢ = top_k(τᵢ); γ = sign(Σᵢ τ̂ᵢ)  ("total")  or  sign(Σᵢ sign(τ̂ᵢ))  ("frequency"),
                      with γ = +1 where that sum is 0; keep eᵢ = [sign(τ̂ᵢ) = γ] and average what agrees:
                      τ = Σᵢ eᵢ wᵢ τ̂ᵢ / max(1, Σᵢ eᵢ)
    dare_ties         ties with top_k replaced by DARE's drop-and-rescale (mᵢ ⊙ τᵢ) / d

top_k keeps the k = ⌊d · numel⌋ entries of largest |τᵢ| and zeroes the rest; d is the density (the
fraction kept). The sign is elected on the unweighted sparsified tensors, as PEFT does; an entry
that is zero has sign 0 and so never agrees. A density of 1 keeps everything (no rescaling).

Applied to LoRA (combine.py calls these):

    "<method>"        on the factors, PEFT's way: with cᵢ = wᵢ sᵢ (sᵢ = αᵢ/rᵢ),
                      A = method({Aᵢ}, {sign(cᵢ) √|cᵢ|}),  B = method({Bᵢ}, {√|cᵢ|});  scale 1, rank r.
    "<method>_svd"    on the dense updates: ΔW = method({sᵢ Bᵢ Aᵢ}, {wᵢ}), then the best rank-k
                      factorization ΔW ≈ U_k Σ_k V_kᵀ: B = U_k Σ_k, A = V_kᵀ.

DARE's masks come from a `torch.Generator` when a seed is given, from torch's global generator
otherwise (so that `torch.manual_seed` before the call reproduces PEFT's draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# Legend: n = number of task tensors; (...) = the shape of one task tensor.

FACTOR_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = tuple(f"{m}_svd" for m in FACTOR_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass
class MergeOptions:
    """What TIES / DARE / magnitude pruning need beyond the adapters and their weights."""

    density: Optional[float] = None  # fraction of each task tensor's entries kept, in (0, 1]
    majority_sign_method: str = "total"  # how ties elects the sign: "total" (sum) or "frequency" (vote)
    seed: Optional[int] = None  # DARE's random masks; None draws from torch's global generator
    svd_clamp: Optional[float] = None  # "*svd": q; clamp U·Σ and Vᵀ to [−h, h], h = q-quantile of their entries
    generator: Optional[torch.Generator] = field(default=None, init=False, repr=False)  # built from seed

    def __post_init__(self):
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.seed))


def base_method(combination_type: str) -> str:
    """"ties_svd" -> "ties"; a factor method stays itself."""
    return combination_type[: -len("_svd")] if combination_type in SVD_METHODS else combination_type


def check_options(combination_type: str, options: MergeOptions) -> None:
    """Refuse a density or sign method that the method cannot use, saying what it takes."""
    if base_method(combination_type) not in FACTOR_METHODS:
        return
    d = options.density
    if d is None or isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
        raise ValueError(f"combination_type={combination_type!r} needs density= in (0, 1], the fraction of each "
                         f"adapter's entries it keeps (0.2 keeps the largest fifth); got {d!r}")
    if "ties" in combination_type and options.majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {options.majority_sign_method!r}")


def magnitude_keep(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """top_k: the ⌊density · numel⌋ entries of largest magnitude, the rest zero."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)  # (numel,)
    keep[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def random_keep(tensor: torch.Tensor, density: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, divide the survivors by density
    (so E[result] = tensor)."""
    if density >= 1:
        return tensor
    probability = torch.full_like(tensor, density)
    mask = torch.bernoulli(probability, generator=generator) if generator is not None else torch.bernoulli(probability)
    return tensor * mask / density


def sign_agreement(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """eᵢ: True where τᵢ has the elected sign γ. (n, ...) -> (n, ...) bool."""
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)  # (...)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)  # (...)
    return stacked.sign() == elected


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], method: str,
                  options: MergeOptions) -> torch.Tensor:
    """One of FACTOR_METHODS (or "linear") over task tensors of one shape; see the module docstring."""
    d = options.density
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_keep(t, d) for t in tensors]
    elif method in ("dare_ties", "dare_linear"):
        tensors = [random_keep(t, d, options.generator) for t in tensors]
    elif method != "linear":
        raise ValueError(f"unknown merge method {method!r}; expected one of {('linear', *FACTOR_METHODS)}")
    stacked = torch.stack(tensors)  # (n, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if method.endswith("ties"):
        agree = sign_agreement(stacked, options.majority_sign_method)  # (n, ...)
        return (stacked * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return (stacked * w).sum(dim=0)
