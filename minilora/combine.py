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

    "ties", "dare_linear", "dare_ties", "magnitude_prune" and their "*_svd" forms: PEFT's TIES /
              DARE / magnitude-pruning merges, on the factors or on the dense updates; formulas in
              merge_methods.py. With one adapter they are "linear", as in PEFT.

These are functions over one layer's factors and the adapters' configs; LoraModel registers the
result as a new adapter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import merge_methods
from .config import LoraConfig
from .lora import LoraPart, LoraLinear
from .merge_methods import MergeOptions
from .modules_to_save import ModulesToSave
from .surgery import plan_adapter

COMBINATIONS = ("cat", "linear", "svd", *merge_methods.FACTOR_METHODS, *merge_methods.SVD_METHODS)
SAME_RANK = ("linear", *merge_methods.FACTOR_METHODS)  # made on the factors: every adapter needs one rank


def effective_type(combination_type: str, n_adapters: int) -> str:
    """PEFT's rule for the merge methods: with one adapter there is nothing to prune against, so "linear"."""
    if n_adapters == 1 and combination_type in merge_methods.FACTOR_METHODS + merge_methods.SVD_METHODS:
        return "linear"
    return combination_type


def check_request(configs: list[LoraConfig], weights: list[float], combination_type: str,
                  options: Optional[MergeOptions] = None) -> None:
    """Refuse a combination that cannot be made, saying why; `configs` of the adapters combined."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(configs) != len(weights) or not configs:
        raise ValueError(f"give one weight per adapter: {len(configs)} adapters, {len(weights)} weights")
    if any(config.use_dora for config in configs):
        raise ValueError("add_weighted_adapter cannot combine DoRA adapters (use_dora=True): their per-row magnitudes "
                         "do not add up; merge_and_unload one of them instead, or mix them per call with adapter_weights=")
    merge_methods.check_options(effective_type(combination_type, len(configs)), options or MergeOptions())


def _factors(layer: LoraLinear, names: list[str], weights: list[float], columns: tuple[int, int, int]):
    """(w, s, A (r, d_in), B (d_part, r)) of each adapter that has a part over these columns."""
    out = []
    for name, w in zip(names, weights):
        for part_name, part in layer.parts.get(name, {}).items():
            if (part.first, part.end, part.blocks) == columns:
                A, B = layer.pair(name, part_name)
                out.append((w, layer.part_scale(name, part_name), A.weight.detach().float(), B.weight.detach().float()))
    return out


def _combine(factors, combination: str, svd_rank: Optional[int], where: str, options: MergeOptions):
    """(A, B, energy) of the new part, scale 1."""
    if combination == "cat":
        A = torch.cat([A for _, _, A, _ in factors])  # (Σr, d_in)
        B = torch.cat([w * s * B for w, s, _, B in factors], dim=1)  # (d_part, Σr)
        return A, B, None
    if combination in SAME_RANK:
        ranks = {A.shape[0] for _, _, A, _ in factors}
        if len(ranks) > 1:
            raise ValueError(
                f"{where}: combination_type={combination!r} needs adapters of one rank, got ranks {sorted(ranks)}; "
                "use 'cat' (exact), 'svd' or the method's '_svd' form instead"
            )
        weights_A = [math.copysign(math.sqrt(abs(w * s)), w * s) for w, s, _, _ in factors]  # sign(c)·√|c|
        weights_B = [math.sqrt(abs(w * s)) for w, s, _, _ in factors]  # √|c|
        A = merge_methods.merge_tensors([A for _, _, A, _ in factors], weights_A, combination, options)  # (r, d_in)
        B = merge_methods.merge_tensors([B for _, _, _, B in factors], weights_B, combination, options)  # (d_part, r)
        return A, B, None
    method = "linear" if combination == "svd" else merge_methods.base_method(combination)
    delta = merge_methods.merge_tensors([s * (B @ A) for _, s, A, B in factors], [w for w, _, _, _ in factors],
                                        method, options)  # (d_part, d_in)
    k = min(svd_rank or max(A.shape[0] for _, _, A, _ in factors), *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    energy = (S[:k].square().sum() / S.square().sum().clamp(min=1e-30)).item()
    B, A = U[:, :k] * S[:k], Vh[:k]  # (d_part, k), (k, d_in)
    if options.svd_clamp is not None:  # PEFT's clamp: both factors into [−h, h], h a quantile of their entries
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), options.svd_clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B, energy


def combine_layer(layer: LoraLinear, adapters: list[str], weights: list[float], combination_type: str,
                  svd_rank: Optional[int], where: str, options: Optional[MergeOptions] = None,
                  ) -> tuple[dict[str, LoraPart], dict[str, tuple], dict[str, float]]:
    """On one layer: the combined adapter's parts (scale 1: alpha = r), its (A, B) per part, and
    the energy each "svd" part keeps. Empty when none of `adapters` is on this layer."""
    columns = dict.fromkeys((p.first, p.end, p.blocks) for a in adapters for p in layer.parts.get(a, {}).values())
    parts, factors, energies = {}, {}, {}
    for first, end, blocks in columns:  # a part's rows: [first, end) of each of `blocks` blocks
        A, B, energy = _combine(_factors(layer, adapters, weights, (first, end, blocks)),
                                effective_type(combination_type, len(adapters)), svd_rank, where,
                                options or MergeOptions())
        part_name = next(n for a in adapters for n, p in layer.parts.get(a, {}).items()
                         if (p.first, p.end, p.blocks) == (first, end, blocks))
        parts[part_name] = LoraPart(first, end, r=A.shape[0], alpha=float(A.shape[0]), blocks=blocks)
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


def add_weighted(model, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
                 svd_rank: Optional[int], options: MergeOptions) -> dict[str, float]:
    """LoraModel.add_weighted_adapter: adapter `adapter_name` ≈ Σ wᵢ adapters[i], layer by layer
    (`combine_layer`), registered on `model`; returns the energy each "*svd" layer keeps."""
    model._check_exists(adapters)
    model._check_new(adapter_name)
    check_request([model.peft_config[a] for a in adapters], weights, combination_type, options)
    shared = model._shared_copies(adapters)
    if shared:
        raise ValueError(f"Cannot add weighted adapters if they target the same module with modules_to_save: "
                         f"several of {adapters} have a trained copy of {shared}, which has no weighted form")
    plan, factors, energies = {}, {}, {}
    for path, layer in model._lora_layers().items():
        layer.check_combinable(adapters, path)
        parts, pairs, kept = combine_layer(layer, adapters, weights, combination_type, svd_rank, path, options)
        if parts:
            plan[path], factors[path] = parts, pairs
            energies.update({f"{path}:{part}": e for part, e in kept.items()})
    config = combined_config(model.peft_config[adapters[0]], plan)
    config.modules_to_save = sorted({m for a in adapters for m in model.peft_config[a].modules_to_save or []}) or None
    model._register(adapter_name, config, plan_adapter(model.model, config, targets=plan))
    for path, pairs in factors.items():
        for part, (A, B) in pairs.items():
            model.model.get_submodule(path).set_factors(adapter_name, part, A, B)
    for wrapper in model._adapter_modules(adapter_name).values():
        if isinstance(wrapper, ModulesToSave):  # the one adapter that trains it gives its copy
            owner = next(a for a in adapters if a in wrapper.modules_to_save)
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owner].state_dict())
    return energies
