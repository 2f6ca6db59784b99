r"""New adapters made from old ones: ΔW_new ≈ Σᵢ wᵢ ΔWᵢ, with ΔWᵢ = sᵢ Bᵢ Aᵢ (sᵢ = αᵢ/rᵢ).

    "cat"     exact. Stack the factors: A = [A₁; A₂; …] (Σrᵢ × d_in), B = [w₁s₁B₁ | w₂s₂B₂ | …]
              (d_out × Σrᵢ), scale 1. Then B·A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ: one adapter of rank Σrᵢ.
    "linear"  approximate, same rank: A = Σᵢ √wᵢ sᵢ Aᵢ, B = Σᵢ √wᵢ Bᵢ, scale 1. Expanding
              B·A = Σᵢ wᵢ sᵢ Bᵢ Aᵢ + Σ_{i≠j} √(wᵢwⱼ) sⱼ Bᵢ Aⱼ: the cross terms are not in the target,
              and vanish only when the adapters' subspaces do not interact.
    "svd"     best rank-k approximation: ΔW = Σᵢ wᵢ sᵢ Bᵢ Aᵢ densely, ΔW = U Σ Vᵀ, keep k:
              B = U_k Σ_k, A = V_kᵀ. The error ‖ΔW − BA‖_F is √(Σ_{j>k} σⱼ²); the captured energy
              Σ_{j≤k} σⱼ² / Σ σⱼ² is reported per layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from .config import LoraConfig
from .lora import LoRALinear

if TYPE_CHECKING:
    from .model import LoraModel

COMBINATIONS = ("cat", "linear", "svd")


def _factors(layer: LoRALinear, names: list[str], weights: list[float], span: tuple[int, int]):
    """(w, s, A (r, d_in), B (d_part, r)) of each adapter that has a part over `span`."""
    out = []
    for name, w in zip(names, weights):
        for part, part_span in layer.spans.get(name, {}).items():
            if part_span == span:
                out.append((w, layer.scaling[name][part], layer.lora_A[name][part].weight.detach().float(),
                            layer.lora_B[name][part].weight.detach().float()))
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
        A = sum(math.sqrt(w) * s * A for w, s, A, _ in factors)
        B = sum(math.sqrt(w) * B for w, _, _, B in factors)
        return A, B, None
    delta = sum(w * s * (B @ A) for w, s, A, B in factors)  # (d_part, d_in)
    k = min(svd_rank or max(A.shape[0] for _, _, A, _ in factors), *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    energy = (S[:k].square().sum() / S.square().sum().clamp(min=1e-30)).item()
    return Vh[:k], U[:, :k] * S[:k], energy


def add_weighted_adapter(model: "LoraModel", adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None) -> dict[str, float]:
    """Add `adapter_name` ≈ Σ wᵢ adapters[i]; returns the captured energy per layer ("svd"), else {}."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    model._check_exists(adapters)
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")
    if combination_type == "linear" and any(w < 0 for w in weights):
        raise ValueError("combination_type='linear' takes square roots of the weights: they must be ≥ 0")
    if any(model.peft_config[a].modules_to_save for a in adapters):
        raise ValueError("adapters with modules_to_save (trained heads) cannot be combined: their heads have no "
                         "low-rank form to weight; combine adapters without modules_to_save")
    energies = {}
    first = model.peft_config[adapters[0]]
    for path, layer in model.model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        spans = dict.fromkeys(s for a in adapters for s in layer.spans.get(a, {}).values())
        if not spans:
            continue
        parts, new = {}, {}
        for i, span in enumerate(spans):
            A, B, energy = _combine(_factors(layer, adapters, weights, span), combination_type, svd_rank, path)
            part = next(p for a in adapters for p, s in layer.spans.get(a, {}).items() if s == span)
            parts[part] = (span, A.shape[0], float(A.shape[0]))  # alpha = r: scale 1
            new[part] = (A, B)
            if energy is not None:
                energies[f"{path}:{part}"] = energy
        layer.add_adapter(adapter_name, parts, init_lora_weights=True)
        with torch.no_grad():
            for part, (A, B) in new.items():
                layer.lora_A[adapter_name][part].weight.copy_(A)
                layer.lora_B[adapter_name][part].weight.copy_(B)
    model.peft_config[adapter_name] = LoraConfig(
        r=max(max(layer.r[adapter_name].values()) for layer in model._lora_layers() if adapter_name in layer.r),
        lora_alpha=first.lora_alpha, target_modules=first.target_modules, task_type=first.task_type,
        inference_mode=True, bias="none",
    )
    model._apply_active()
    return energies
