"""The walker: decide which modules get which adapter, swap them in place, freeze the rest.

    resolve_targets(model, config)  ->  {module path: {part: ((first, end), r, alpha)}}
    inject_adapter(model, config, name)    wraps targets in LoRALinear (or adds to existing ones)
    wrap_modules_to_save(model, names, adapter)   trainable full copies (LM head, classifier)
    mark_trainable(model, active, bias)     requires_grad only where training should happen

Nothing here matches silently: a target entry that selects nothing is an error that lists the
nearest module names and the roles this model family has.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from typing import Optional

import torch.nn as nn

from .config import LoraConfig
from .lora import FULL, LoRALinear
from .roles import Site, classify, family_of, parse_selector, supported_roles, walk

# PEFT's defaults when target_modules is None, per family.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

# Heads that PEFT trains in full for these task types, whichever of them the model has.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

Parts = dict[str, tuple[tuple[int, int], int, float]]  # part -> ((first, end) columns, r, alpha)


def _name_matches(name: str, key: str) -> bool:
    """PEFT's list rule: the exact path, or a suffix after a dot."""
    return name == key or name.endswith("." + key)


def has_module(model: nn.Module, key: str) -> bool:
    """Whether any module's path is `key` or ends with "." + `key`."""
    return any(_name_matches(n, key) for n, _ in walk(model))


def _pattern_matches(name: str, key: str) -> bool:
    """PEFT's rank_pattern rule: a suffix after a dot, where the key may be a regex."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


def _matches(name: str, spec) -> bool:
    """target_modules / exclude_modules: a str is a regex on the whole path, a list holds names."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_name_matches(name, key) for key in spec)


def _output_layer_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in walk(model) if head is not None and m is head}


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
        roles = f"Roles for {family}: {', '.join(supported_roles(model))}."
    else:
        roles = (f"{type(model).__name__} is of no family minilora knows, so role names (q, v, ffn, ...) "
                 "are unavailable: use module names.")
    return ValueError(
        f"target_modules entry {entry!r} {why} in {type(model).__name__}. "
        f"Nearest module names: {', '.join(_nearest(entry, sites))}. {roles} Fix target_modules."
    )


def resolve_targets(model: nn.Module, config: LoraConfig) -> dict[str, Parts]:
    """Which modules get LoRA, over which output columns, with which rank and alpha."""
    sites = classify(model, config.layers_pattern)
    family = family_of(model)
    depths = _depths(sites)
    _check_layers(config, depths)

    targets = config.target_modules
    if targets is None:
        if family not in DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules is required for {type(model).__name__} (no default for its family); "
                f"e.g. target_modules={_nearest('q_proj', sites)[:2]}"
            )
        targets = DEFAULT_TARGETS[family]

    chosen: dict[str, set[str]] = {}  # path -> parts ({FULL} for the whole layer)
    if targets == "all-linear":
        heads = _output_layer_names(model)
        chosen = {name: {FULL} for name in sites if name not in heads}
    elif isinstance(targets, str):
        chosen = {name: {FULL} for name in sites if re.fullmatch(targets, name)}
        if not chosen:
            raise _unmatched_error(targets, model, sites, "(a regex on the full path) matched no module")
    else:
        for entry in targets:
            hits = _select(entry, sites, family is not None)
            if not hits:
                raise _unmatched_error(entry, model, sites, "matched no module")
            for name, part in hits:
                chosen.setdefault(name, set()).add(part)
        for name, parts in chosen.items():
            if FULL in parts and len(parts) > 1:
                raise ValueError(
                    f"{name} is targeted whole and by slice ({', '.join(sorted(parts - {FULL}))}); "
                    "pick one: its module name for one LoRA over the fused output, or role names for slices"
                )

    plan: dict[str, Parts] = {}
    for name, parts in chosen.items():
        site = sites[name]
        if _matches(name, config.exclude_modules):
            continue
        band_rank = _band_rank(config, site, depths)
        if band_rank is False:
            continue
        r, alpha = _rank_alpha(config, site, band_rank)
        spans = _spans(site, parts)
        plan[name] = {part: (span, r, alpha) for part, span in spans.items()}

    if not plan:
        raise ValueError(
            f"target_modules={targets!r} matched modules, but layers_to_transform / layer_bands / "
            f"exclude_modules removed them all (model depth: {dict(depths)}). Widen the layer selection."
        )
    return plan


def _select(entry: str, sites: dict[str, Site], known_family: bool) -> list[tuple[str, str]]:
    """(path, part) pairs selected by one target_modules entry: a role selector or a module name."""
    selector = parse_selector(entry) if known_family else None
    if selector is None:
        return [(name, FULL) for name in sites if _name_matches(name, entry)]
    hits = []
    for name, site in sites.items():
        if site.parts:  # fused: pick the matching slices
            hits += [(name, part) for part, _ in site.parts if selector.matches(site, part)]
        elif site.role and selector.matches(site, site.role):
            hits.append((name, FULL))
    return hits


def _spans(site: Site, parts: set[str]) -> dict[str, tuple[int, int]]:
    if parts == {FULL}:
        return {FULL: (0, -1)}  # -1: resolved to d_out when the module is wrapped
    spans, first = {}, 0
    for part, size in site.parts:
        if part in parts:
            spans[part] = (first, first + size)
        first += size
    return spans


def _check_layers(config: LoraConfig, depths: dict) -> None:
    if config.layers_to_transform is None:
        return
    if not depths:
        raise ValueError("layers_to_transform is set, but no module of this model has a layer index")
    depth = max(depths.values())
    bad = [i for i in config.layers_to_transform if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"layers_to_transform has {bad}, but the model has {depth} layers (indices 0..{depth - 1})"
        )


def _band_rank(config: LoraConfig, site: Site, depths) -> "tuple[int, float] | None | bool":
    """False: this layer gets no LoRA. None: no band decides the rank. Else the band's (r, alpha)."""
    if config.layers_to_transform is not None:
        return None if site.layer in config.layers_to_transform else False
    if config.layer_bands is None:
        return None
    if site.layer is None:
        return False
    for band in config.layer_bands:
        if site.layer in band.layers(depths[site.stack]):
            return band.r, band.lora_alpha
    return False


def _rank_alpha(config: LoraConfig, site: Site, band_rank) -> tuple[int, float]:
    r, alpha = config.r, config.lora_alpha
    if band_rank is not None:
        r, alpha = band_rank
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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every target in a LoRALinear (or add to one already there). Returns the paths."""
    plan = resolve_targets(model, config)
    for name, parts in plan.items():
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoRALinear) else LoRALinear(module)
        parts = {p: ((f, layer.out_features if e == -1 else e), r, a) for p, ((f, e), r, a) in parts.items()}
        try:
            layer.add_adapter(
                adapter_name,
                parts,
                lora_dropout=config.lora_dropout,
                init_lora_weights=config.init_lora_weights,
                use_rslora=config.use_rslora,
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if layer is not module:
            _set_submodule(model, name, layer)
        if layer.fan_in_fan_out:
            config.fan_in_fan_out = True  # recorded for PEFT: GPT-2 Conv1D stores W as (in, out)
    return sorted(plan)


class ModulesToSave(nn.Module):
    """A module trained in full: the original stays frozen, each adapter trains its own copy."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()  # adapter -> trainable copy
        self.active_adapters: list[str] = []  # the first one with a copy is used
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)  # own storage: untied

    @property
    def active_module(self) -> nn.Module:
        active = next((n for n in self.active_adapters if n in self.modules_to_save), None)
        if self.disabled or active is None:
            return self.original_module
        return self.modules_to_save[active]

    @property
    def weight(self):  # code that reads `lm_head.weight` sees the module in use
        return self.active_module.weight

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)


def wrap_modules_to_save(model: nn.Module, names: Optional[list[str]], adapter_name: str) -> list["ModulesToSave"]:
    """Give `adapter_name` a trainable copy of each module named in `names`; the wrappers."""
    wrappers = []
    if not names:
        return wrappers
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied_to = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    modules = dict(walk(model))
    for key in names:
        paths = [n for n in modules if _name_matches(n, key)]  # walk() never enters a wrapper
        if not paths:
            near = difflib.get_close_matches(key, sorted({n.rsplit(".", 1)[-1] for n in modules}), n=5)
            raise ValueError(f"modules_to_save entry {key!r} matched no module; nearest names: {near}")
        for path in paths:
            module = modules[path]
            if not isinstance(module, ModulesToSave):
                if any(id(p) in tied_to for p in module.parameters()):
                    warnings.warn(
                        f"{path} shares its weight with the input embeddings; its trainable copy is "
                        "untied so the embeddings stay frozen",
                        stacklevel=3,
                    )
                wrapper = ModulesToSave(module)
                _set_submodule(model, path, wrapper)
                module = wrapper
            if adapter_name in module.modules_to_save:
                raise ValueError(f"{path} already has a copy for adapter {adapter_name!r}")
            module.add(adapter_name)
            wrappers.append(module)
    return wrappers


def mark_trainable(model: nn.Module, active: list[str], bias: str = "none") -> None:
    """requires_grad only for the active adapters' LoRA weights, their module copies and biases."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for name in active:
                if name in module.lora_A:
                    module.lora_A[name].requires_grad_(True)
                    module.lora_B[name].requires_grad_(True)
            if bias == "lora_only" and module.base_layer.bias is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for name in active:
                if name in module.modules_to_save:
                    module.modules_to_save[name].requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and "lora_" not in name:
                p.requires_grad_(True)


def adapter_layers(model: nn.Module):
    """Every LoRALinear and ModulesToSave in `model`."""
    return [m for _, m in walk(model) if isinstance(m, (LoRALinear, ModulesToSave))]

