r"""A trained PiSSA / OLoRA adapter as a plain LoRA over the original base (PEFT's conversion).

PiSSA and OLoRA move s·B₀A₀ out of the base at initialisation (named_init.py): the model trains on
W_res = W − s·B₀A₀ and ends at W_res + s·B·A. Relative to the original W the change is

    ΔW = W_res + s·B·A − W = s·(B·A − B₀·A₀) = s · [B | −B₀] · [A ; A₀]

a LoRA of rank 2r: A' = [A ; A₀] (rows stacked, 2r × d_in), B' = [B | −B₀] (columns side by side,
d_out × 2r). Its scale must stay s, so alpha doubles with the rank (α' = 2α, since 2α / 2r = α / r),
or grows by √2 with rsLoRA (√2·α / √(2r) = α / √r). The result loads on the untouched base model,
next to other adapters, in minilora and in PEFT alike.

A₀ and B₀ come from the adapter saved right after initialisation, before any training step.
Tensors other than A and B (trained copies of whole modules, trained biases) hold absolute values
and are kept as they are.
"""

from __future__ import annotations

import copy
import math

import torch

from .config import LoraConfig


def _doubled(config: dict, use_rslora: bool) -> dict:
    """A config dict (PEFT's keys) for rank 2r at the same scale, with LoRA's default start."""
    out = dict(config)
    growth = math.sqrt(2) if use_rslora else 2
    out.update(r=2 * config["r"], lora_alpha=config["lora_alpha"] * growth, init_lora_weights=True)
    out["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * growth for k, v in (config.get("alpha_pattern") or {}).items()}
    return out


def check_convertible(config: LoraConfig) -> None:
    """Refuse the configurations the conversion cannot express, as PEFT does."""
    if config.init_lora_weights == "loftq":
        raise ValueError("a LoftQ adapter belongs to its quantized base (LoftQ chose the two together): there is no "
                         "plain LoRA relative to the original weight; save it without "
                         "path_initial_model_for_weight_conversion and load it on the LoftQ base")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion cannot be used with rank_pattern or alpha_pattern "
                         "together with use_rslora=True: per-module alphas cannot keep the rsLoRA scale exactly")


def to_plain_lora(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], peft_config: dict,
                  config: LoraConfig) -> tuple[dict[str, torch.Tensor], dict, LoraConfig]:
    """(tensors, PEFT config dict, LoraConfig) of the rank-2r LoRA equal to the trained adapter
    `tensors` relative to the original base, given the adapter `initial` saved at initialisation."""
    check_convertible(config)
    factors = [k for k in tensors if ".lora_A." in k or ".lora_B." in k]
    if any(".lora_magnitude_vector" in k for k in tensors):
        raise ValueError("a DoRA adapter cannot be converted to a plain LoRA this way; save it without "
                         "path_initial_model_for_weight_conversion")
    missing = [k for k in factors if k not in initial]
    if missing:
        raise ValueError(f"the initial adapter lacks {missing[0]} (and {len(missing) - 1} more): pass the directory "
                         "saved right after initialisation of this same adapter")
    out = dict(tensors)
    for key in factors:
        now, start = tensors[key], initial[key].to(tensors[key].dtype)
        if now.shape != start.shape:
            raise ValueError(f"{key}: the trained adapter has shape {tuple(now.shape)} but the initial one "
                             f"{tuple(start.shape)}; pass the initial adapter of this same configuration")
        if ".lora_A." in key:
            out[key] = torch.cat([now, start], dim=0)  # [A ; A₀]: (2r, d_in)
        else:
            out[key] = torch.cat([now, -start], dim=1)  # [B | −B₀]: (d_out, 2r)
    converted = copy.deepcopy(config)
    own = _doubled({"r": config.r, "lora_alpha": config.lora_alpha, "rank_pattern": config.rank_pattern,
                    "alpha_pattern": config.alpha_pattern}, config.use_rslora)
    for key, value in own.items():
        setattr(converted, key, value)
    converted.layer_bands = None if config.layer_bands is None else tuple(
        type(b)(b.start, b.end, 2 * b.r, b.lora_alpha * (math.sqrt(2) if config.use_rslora else 2))
        for b in config.layer_bands)
    converted.component_ranks = {k: (2 * r, a * (math.sqrt(2) if config.use_rslora else 2))
                                 for k, (r, a) in config.component_ranks.items()}
    return out, _doubled(peft_config, config.use_rslora), converted
