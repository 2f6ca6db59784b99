r"""New adapters made from old ones: ΔW_new ≈ Σᵢ wᵢ ΔWᵢ, with ΔWᵢ = sᵢ Bᵢ Aᵢ (sᵢ = αᵢ/rᵢ).

    "cat"     exact. Stack the factors: A = [A₁; A₂; …] (Σrᵢ × d_in), B = [w₁s₁B₁ | w₂s₂B₂ | …]
              (d_out × Σrᵢ), scale 1. Then B·A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ: one adapter of rank Σrᵢ.
    "linear"  approximate, same rank, PEFT's formula: with cᵢ = wᵢ sᵢ,
              A = Σᵢ sign(cᵢ) √|cᵢ| Aᵢ, B = Σᵢ √|cᵢ| Bᵢ, scale 1. Expanding,
              B·A = Σᵢ cᵢ Bᵢ Aᵢ + Σ_{i≠j} sign(cⱼ) √|cᵢcⱼ| Bᵢ Aⱼ: the cross terms are not in the target,
              and vanish only when the adapters' subspaces do not interact. A negative weight
              negates an adapter (task arithmetic's "forgetting by negation").
    "svd"     best rank-k approximation: ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ densely, ΔW = U Σ Vᵀ, keep k:
              B = U_k Σ_k, A = V_kᵀ. The error ‖ΔW − BA‖_F is √(Σ_{j>k} σⱼ²); the captured energy
              Σ_{j≤k} σⱼ² / Σ σⱼ² is reported per layer.

These are functions over one layer's factors and the adapters' configs; LoraModel registers the
result as a new adapter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import LoraConfig
from .lora import LoraPart, LoRALinear

COMBINATIONS = ("cat", "linear", "svd")


def check_request(configs: list[LoraConfig], weights: list[float], combination_type: str) -> None:
    """Refuse a combination that cannot be made, saying why; `configs` of the adapters combined."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(configs) != len(weights) or not configs:
        raise ValueError(f"give one weight per adapter: {len(configs)} adapters, {len(weights)} weights")
    if any(config.use_dora for config in configs):
        raise ValueError("add_weighted_adapter cannot combine DoRA adapters (use_dora=True): their per-row magnitudes "
                         "do not add up; merge_and_unload one of them instead, or mix them per call with adapter_weights=")


def _factors(layer: LoRALinear, names: list[str], weights: list[float], columns: tuple[int, int]):
    """(w, s, A (r, d_in), B (d_part, r)) of each adapter that has a part over these columns."""
    out = []
    for name, w in zip(names, weights):
        for part_name, part in layer.parts.get(name, {}).items():
            if (part.first, part.end) == columns:
                out.append((w, layer.scaling[name][part_name], layer.lora_A[name][part_name].weight.detach().float(),
                            layer.lora_B[name][part_name].weight.detach().float()))
    return out


def _combine(factors, combination: str, svd_rank: Optional[int], where: str):
    """(A, B, energy) of the new part, scale 1."""
    if combination == "cat":
        A = torch.cat([A for _, _, A, _ in factors])  # (Σr, d_in)
        B = torch.cat([w * s * B for w, s, _, B in factors], dim=1)  # (d_part, Σr)
        return A, B, None
    if combination == "linear":
        ranks = {A.shape[0] for _, _, A, _ in factors}
        if len(ranks) > 1:
            raise ValueError(
                f"{where}: combination_type='linear' needs adapters of one rank, got ranks {sorted(ranks)}; "
                "use 'cat' (exact) or 'svd' instead"
            )
        A = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * A for w, s, A, _ in factors)
        B = sum(math.sqrt(abs(w * s)) * B for w, s, _, B in factors)
        return A, B, None
    delta = sum(w * s * (B @ A) for w, s, A, B in factors)  # (d_part, d_in)
    k = min(svd_rank or max(A.shape[0] for _, _, A, _ in factors), *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    energy = (S[:k].square().sum() / S.square().sum().clamp(min=1e-30)).item()
    return Vh[:k], U[:, :k] * S[:k], energy


def combine_layer(layer: LoRALinear, adapters: list[str], weights: list[float], combination_type: str,
                  svd_rank: Optional[int], where: str) -> tuple[dict[str, LoraPart], dict[str, tuple], dict[str, float]]:
    """On one layer: the combined adapter's parts (scale 1: alpha = r), its (A, B) per part, and
    the energy each "svd" part keeps. Empty when none of `adapters` is on this layer."""
    columns = dict.fromkeys((p.first, p.end) for a in adapters for p in layer.parts.get(a, {}).values())
    parts, factors, energies = {}, {}, {}
    for first, end in columns:
        A, B, energy = _combine(_factors(layer, adapters, weights, (first, end)), combination_type, svd_rank, where)
        part_name = next(n for a in adapters for n, p in layer.parts.get(a, {}).items() if (p.first, p.end) == (first, end))
        parts[part_name] = LoraPart(first, end, r=A.shape[0], alpha=float(A.shape[0]))
        factors[part_name] = (A, B)
        if energy is not None:
            energies[part_name] = energy
    return parts, factors, energies


def combined_config(first: LoraConfig, plan: dict[str, dict[str, LoraPart]]) -> LoraConfig:
    """The new adapter's config: the largest rank it got, the first adapter's targets; inference only."""
    return LoraConfig(
        r=max(part.r for parts in plan.values() for part in parts.values()),
        lora_alpha=first.lora_alpha, target_modules=first.target_modules, task_type=first.task_type,
        inference_mode=True, bias="none",
    )
