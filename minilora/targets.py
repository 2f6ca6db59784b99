"""Target resolution: which modules (or 3-D expert weights) of a model get LoRA, over which
output parts, with which rank and alpha, from a LoraConfig and one walk of the model.

    resolve_targets(model, config, walked)  ->  Plan: {module path: {part name: LoraPart}}

Names follow PEFT's rules (a list of names or suffixes, a regex on the whole path, "all-linear",
PEFT's defaults per model type, layers_to_transform, rank_pattern / alpha_pattern); role names
(q, v, ffn, ...) select slices of fused layers by family (roles.py). Nothing matches silently: an
entry that selects nothing is an error that lists the nearest module names and the roles this
model family has.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Optional

import torch.nn as nn

from .config import Band, LoraConfig
from .conv import CONV, conv_sites
from .embedding import EMBEDDING, embedding_sites
from .families import DEFAULT_TARGETS
from .lora import LoraPart
from .roles import (FULL, Part, Site, classify, family_of, name_matches, parameter_sites, parse_selector,
                    supported_roles, walk)

Plan = dict[str, dict[str, LoraPart]]  # module path -> {part name -> LoraPart}; "<owner>.<parameter>" for 3-D weights
Walked = list[tuple[str, nn.Module]]  # the (path, module) pairs of one walk(model)


def _pattern_matches(name: str, key: str) -> bool:
    """PEFT's rank_pattern rule: a suffix after a dot, where the key may be a regex."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


def _matches(name: str, spec) -> bool:
    """target_modules / exclude_modules: a str is a regex on the whole path, a list holds names."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, key) for key in spec)


def _output_layer_names(model: nn.Module, walked: list[tuple[str, nn.Module]]) -> set[str]:
    """The paths of the model's output layer (its LM head), among the (path, module) pairs of one walk."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in walked if head is not None and m is head}


def _depths(sites: dict[str, Site]) -> dict[Optional[str], int]:
    """Number of layers per stack (encoder / decoder / None)."""
    depth: dict[Optional[str], int] = {}
    for s in sites.values():
        if s.layer is not None:
            depth[s.stack] = max(depth.get(s.stack, 0), s.layer + 1)
    return depth


def _nearest(entry: str, sites: dict[str, Site]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in sites} | {".".join(n.split(".")[-2:]) for n in sites})
    return difflib.get_close_matches(entry, leaves, n=5, cutoff=0.4) or leaves[:8]


def _unmatched_error(entry: str, model: nn.Module, sites: dict[str, Site], why: str) -> ValueError:
    family = family_of(model)
    if family:
        roles = f"Roles for {family}: {', '.join(supported_roles(model, sites.values()))}."
    else:
        roles = (f"{type(model).__name__} is of no family minilora knows, so role names (q, v, ffn, ...) "
                 "are unavailable: use module names.")
    return ValueError(
        f"target_modules entry {entry!r} {why} in {type(model).__name__}. "
        f"Nearest module names: {', '.join(_nearest(entry, sites))}. {roles} Fix target_modules."
    )


def resolve_targets(model: nn.Module, config: LoraConfig, walked: Optional[Walked] = None) -> Plan:
    """Which modules get LoRA, over which output columns, with which rank and alpha. `walked`: the
    pairs of a walk(model) the caller made already."""
    walked = list(walk(model)) if walked is None else walked  # the one walk every kind of site is read from
    pattern = config.layers_pattern
    sites = {**classify(model, pattern, walked), **embedding_sites(model, walked),  # embeddings, convolutions:
             **conv_sites(model, pattern, walked),  # by name only
             **parameter_sites(model, pattern, walked)}  # 3-D expert weights: by role or target_parameters
    family = family_of(model)
    depths = _depths(sites)
    _check_layers(config, depths)
    modules = {name: site for name, site in sites.items() if not site.is_parameter}  # what module names match

    targets = config.target_modules
    if targets is None and config.target_parameters:
        targets = []  # parameters only, as PEFT allows
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:  # PEFT has no default for it either
            roles = f" or role names ({', '.join(supported_roles(model, sites.values()))})" if family else ""
            raise ValueError(
                f"target_modules is required for {type(model).__name__} (model_type {model_type!r} has no default "
                f"targets in PEFT); e.g. target_modules={_nearest('q_proj', sites)[:2]}{roles}"
            )
        targets = DEFAULT_TARGETS[model_type]

    chosen: dict[str, set[str]] = {}  # path -> parts ({FULL} for the whole layer)
    if targets == "all-linear":
        heads = _output_layer_names(model, walked)
        chosen = {name: {FULL} for name, site in modules.items() if name not in heads and site.role not in (EMBEDDING, CONV)}
        experts = sorted(name for name, site in sites.items() if site.is_parameter and site.role)
        if experts and not config.target_parameters:  # PEFT's "all-linear" leaves them out too; say so
            warnings.warn(f"'all-linear' adapts Linear layers only; the experts' 3-D weights ({experts[0]}, ...) stay "
                          "untrained: add target_parameters, or use role names ('gate', 'up', 'down') to adapt them",
                          stacklevel=4)
    elif isinstance(targets, str):
        chosen = {name: {FULL} for name in modules if re.fullmatch(targets, name)}
        if not chosen:
            raise _unmatched_error(targets, model, sites, "(a regex on the full path) matched no module")
    else:
        unmatched = []
        for entry in targets:
            hits = _select(entry, sites, family is not None)
            unmatched += [] if hits else [entry]
            for name, part in hits:
                chosen.setdefault(name, set()).add(part)
        if not chosen and targets:  # nothing at all: an error, as in PEFT
            raise _unmatched_error(unmatched[0], model, sites, "matched no module")
        present = set(supported_roles(model, sites.values())) if family and unmatched else set()
        for entry in unmatched:  # a role this family lacks is a mistake, not a misspelling to shrug off
            selector = parse_selector(entry) if family else None
            if selector is not None and not present & set(selector.roles):
                raise _unmatched_error(entry, model, sites, "names a role this model does not have")
        for entry in unmatched:  # PEFT is silent here; a misspelt entry deserves a word
            warnings.warn(f"target_modules entry {entry!r} matched no module in {type(model).__name__} (the other "
                          f"entries did); nearest module names: {', '.join(_nearest(entry, sites))}", stacklevel=4)
        for name, parts in chosen.items():
            if FULL in parts and len(parts) > 1:
                raise ValueError(
                    f"{name} is targeted whole and by slice ({', '.join(sorted(parts - {FULL}))}); "
                    "pick one: its module name for one LoRA over the fused output, or role names for slices"
                )

    for key in config.target_parameters or []:
        hits = [name for name, site in sites.items() if site.is_parameter and name_matches(name, key)]
        if not hits:
            found = sorted({".".join(n.split(".")[-2:]) for n, site in sites.items() if site.is_parameter})
            raise ValueError(f"target_parameters entry {key!r} matched no 3-D parameter of {type(model).__name__}; "
                             f"its 3-D parameters end in: {', '.join(found) or 'none'}. Fix target_parameters.")
        for name in hits:
            chosen.setdefault(name, set()).add(FULL)

    saved = config.modules_to_save or []
    plan: Plan = {}
    excluded = 0
    for name, part_names in chosen.items():
        site = sites[name]
        if any(name_matches(name, key) for key in saved):  # trained in full: no LoRA on it, as in PEFT
            continue
        if _matches(name, config.exclude_modules):
            excluded += 1
            continue
        if not _layer_selected(config, site, depths):
            continue
        r, alpha = _rank_alpha(config, site, _band(config, site, depths))
        plan[name] = {part.name: LoraPart(part.first, part.end, r, alpha, part.blocks) for part in _parts(site, part_names)}

    if not plan:
        raise ValueError(
            f"target_modules={targets!r} matched modules, but layers_to_transform / layer_bands / "
            f"exclude_modules / modules_to_save removed them all (model depth: {dict(depths)}). Widen the selection."
        )
    if config.exclude_modules and not excluded:
        warnings.warn(f"exclude_modules={config.exclude_modules!r} excluded no module: check its spelling", stacklevel=4)
    return plan


def _select(entry: str, sites: dict[str, Site], known_family: bool) -> list[tuple[str, str]]:
    """(path, part) pairs selected by one target_modules entry: a role selector or a module name."""
    selector = parse_selector(entry) if known_family else None
    if selector is None:
        return [(name, FULL) for name, site in sites.items() if not site.is_parameter and name_matches(name, entry)]
    hits = []
    for name, site in sites.items():
        if site.layout_problem and any(selector.matches(site, role) for role in site.role.split("_")):
            raise ValueError(f"target_modules entry {entry!r} selects a slice of {site.layout_problem}")
        if site.parts:  # fused: pick the matching slices
            hits += [(name, part.name) for part in site.parts if selector.matches(site, part.name)]
        elif site.role and selector.matches(site, site.role):
            hits.append((name, FULL))
    return hits


def _parts(site: Site, names: set[str]) -> list[Part]:
    """The parts of `site` called `names`, in output order; FULL is every column."""
    if names == {FULL}:
        return [Part(FULL, 0, site.out_features)]
    return [part for part in site.parts if part.name in names]


def _check_layers(config: LoraConfig, depths: dict) -> None:
    if config.layers_to_transform is None:
        return
    if not depths:
        raise ValueError("layers_to_transform is set, but no module of this model has a layer index")
    depth = max(depths.values())
    bad = [i for i in config.layers_to_transform if not 0 <= i < depth]
    if bad:  # PEFT selects nothing there, silently; say so
        warnings.warn(f"layers_to_transform has {bad}, but the model has {depth} layers (indices 0..{depth - 1}): "
                      "those select nothing", stacklevel=5)


def _layer_selected(config: LoraConfig, site: Site, depths) -> bool:
    """Whether the layer of `site` gets LoRA at all (layers_to_transform, or any band covering it)."""
    if config.layers_to_transform is not None:
        return site.layer in config.layers_to_transform
    if config.layer_bands is None:
        return True
    return _band(config, site, depths) is not None


def _band(config: LoraConfig, site: Site, depths) -> Optional[Band]:
    """The layer band that covers `site`, if bands are in use (and layers_to_transform is not)."""
    if config.layers_to_transform is not None or config.layer_bands is None or site.layer is None:
        return None
    return next((b for b in config.layer_bands if site.layer in b.layers(depths[site.stack])), None)


def _rank_alpha(config: LoraConfig, site: Site, band: Optional[Band]) -> tuple[int, float]:
    r, alpha = config.r, config.lora_alpha
    if band is not None:
        r, alpha = band.r, band.lora_alpha
    if site.component in config.component_ranks:
        r, alpha = config.component_ranks[site.component]
    for key, value in config.rank_pattern.items():
        if _pattern_matches(site.name, key):
            r = value
            break
    for key, value in config.alpha_pattern.items():
        if _pattern_matches(site.name, key):
            alpha = value
            break
    return r, alpha
