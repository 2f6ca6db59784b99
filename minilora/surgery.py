"""The walker: decide, in one walk, what an adapter changes in a model; then change it.

    plan_adapter(model, config)  ->  AdapterPlan     one walk over the model, read into:
        layers            {module path: LayerPlan(kind, parts)}: which layer kind wraps it, over
                          which output parts, with which rank and alpha (resolve_targets)
        modules_to_save   paths trained in full (the config's names and PEFT's task heads)
        trainable_tokens  {embedding path: token ids}, and the heads tied to those embeddings
    apply_plan(model, plan, name, config, state)    wraps and adds; no walk, one path lookup per change
    trained_biases(model, bias)                     the biases an adapter with this `bias` trains

Surgery changes modules; which parameters train, and which adapters are active, is the
LoraModel's business alone.

Nothing here matches silently: a target entry that selects nothing is an error that lists the
nearest module names and the roles this model family has.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from .adapter_layer import AdapterLayer
from .config import Band, LoraConfig
from .conv import CONV, CONV_TYPES, LoRAConv, conv_sites
from .embedding import EMBEDDING, LoRAEmbedding, embedding_sites
from .families import DEFAULT_TARGETS
from .lora import AdapterState, LoraPart, LoRALinear
from .experts import LoRAExperts
from .modules_to_save import ModulesToSave, wrap_modules_to_save
from .trainable_tokens import TrainableTokens, add_trainable_tokens
from .variants import VARIANTS
from .roles import (FULL, Part, Site, classify, family_of, name_matches, parameter_sites, parse_selector,
                    set_submodule, supported_roles, walk)


# Heads that PEFT trains in full for these task types, whichever of them the model has.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

Plan = dict[str, dict[str, LoraPart]]  # module path -> {part name -> LoraPart}; "<owner>.<parameter>" for 3-D weights
ADAPTER_LAYERS = (AdapterLayer,)  # the layers that hold LoRA factors (kept for code that imported it)
Walked = list[tuple[str, nn.Module]]  # the (path, module) pairs of one walk(model)


@dataclass
class LayerPlan:
    """One module's LoRA: the layer kind that wraps it (or the adapter layer already there), the
    options it is built with, and its parts ({part: LoraPart}; for 3-D expert weights
    {parameter: {part: LoraPart}})."""

    kind: type
    parts: dict
    options: dict = field(default_factory=dict)


@dataclass
class AdapterPlan:
    """Everything one adapter changes in a model, read in one walk (see the module docstring)."""

    layers: dict[str, LayerPlan]
    modules_to_save: list[str] = field(default_factory=list)  # module paths
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)  # embedding path -> token ids
    tied_heads: dict[str, str] = field(default_factory=dict)  # embedding path -> path of the head sharing its rows


def has_module(model: nn.Module, key: str, walked: Optional[Walked] = None) -> bool:
    """Whether any module's path is `key` or ends with "." + `key`."""
    return any(name_matches(n, key) for n, _ in (walk(model) if walked is None else walked))


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


def plan_adapter(model: nn.Module, config: LoraConfig, targets: Optional[Plan] = None) -> AdapterPlan:
    """What adapter `config` changes in `model`, read in one walk. `targets`: LoRA's modules
    already decided (a combination of adapters), instead of resolving config.target_modules.
    PEFT's task heads for config.task_type are added to config.modules_to_save, as PEFT does."""
    walked = list(walk(model))
    heads = [h for h in TASK_HEADS.get(config.task_type, ()) if has_module(model, h, walked)]
    if heads:  # as PEFT does: a task head trains along with the adapter
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(heads))
    if targets is None:
        targets = resolve_targets(model, config, walked)
    modules = dict(walked)
    saved = _modules_to_save_paths(modules, config.modules_to_save)
    tokens, tied = _token_paths(model, modules, config.trainable_token_indices)
    for path in tokens:
        if path in targets or path in saved or not TrainableTokens.can_wrap(modules[path]):
            raise ValueError(f"trainable_token_indices names {path}, which is not a plain nn.Embedding (it is "
                             f"adapted by LoRA, trained as a copy, or a {type(modules[path]).__name__}); leave it out "
                             "of target_modules and modules_to_save, or name an embedding")
    return AdapterPlan(_layer_plans(model, modules, targets), saved, tokens, tied)


def apply_plan(model: nn.Module, plan: AdapterPlan, adapter_name: str, config: LoraConfig,
               state: AdapterState) -> tuple[list, list[ModulesToSave]]:
    """Carry out `plan` for adapter `adapter_name`: LoRA layers, trained copies, trainable tokens,
    each reading `state`. (the adapter layers, the trained copies)."""
    layers = inject_adapter(model, plan, adapter_name, config, state)
    copies = wrap_modules_to_save(model, plan.modules_to_save, adapter_name, state)
    layers += add_trainable_tokens(model, plan.trainable_tokens, plan.tied_heads, adapter_name, state)
    return layers, copies


def _modules_to_save_paths(modules: dict[str, nn.Module], names: Optional[list[str]]) -> list[str]:
    """The paths modules_to_save names (PEFT's list rule); an entry matching nothing is an error."""
    paths = []
    for key in names or []:
        hits = [n for n in modules if name_matches(n, key)]  # walk() never enters a wrapper
        if not hits:
            near = difflib.get_close_matches(key, sorted({n.rsplit(".", 1)[-1] for n in modules}), n=5)
            raise ValueError(f"modules_to_save entry {key!r} matched no module; nearest names: {near}")
        paths += [h for h in hits if h not in paths]
    return paths


def _token_paths(model: nn.Module, modules: dict[str, nn.Module], token_indices
                 ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """PEFT's rule for trainable_token_indices: a list means the input embeddings, a dict maps module
    names to lists. ({embedding path: ids}, {embedding path: path of a head tied to it})."""
    if token_indices is None:
        return {}, {}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(token_indices, dict):
        path = next((n for n, m in modules.items() if m is embedding), None)
        if path is None:
            raise ValueError("trainable_token_indices as a list needs a model with input embeddings "
                             "(get_input_embeddings); give a dict {embedding module name: token ids}")
        token_indices = {path: token_indices}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_path = next((n for n, m in modules.items() if head is not None and m is head), None)
    tokens, tied = {}, {}
    for key, indices in token_indices.items():
        paths = [n for n in modules if name_matches(n, key)]
        if not paths:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module; name an embedding")
        for path in paths:
            tokens[path] = list(indices)
            table = getattr(modules[path], "weight", None)
            if head_path is not None and head_path != path and getattr(head, "weight", None) is table:
                tied[path] = head_path
    return tokens, tied


def _layer_plans(model: nn.Module, modules: dict[str, nn.Module], targets: Plan) -> dict[str, LayerPlan]:
    """The layer kind for each target: the adapter layer already there, LoRAExperts for a module
    owning 3-D expert weights the plan names, LoRAEmbedding, LoRAConv or LoRALinear by base type."""
    plans: dict[str, LayerPlan] = {}
    for name, parts in targets.items():
        owner, _, parameter = name.rpartition(".")
        module = modules.get(owner)
        value = getattr(getattr(module, "base_layer", module), parameter, None)
        if name not in modules and isinstance(value, nn.Parameter) and value.dim() == 3:
            kind = type(module) if isinstance(module, AdapterLayer) else LoRAExperts
            plans.setdefault(owner, LayerPlan(kind, {})).parts[parameter] = parts
            continue
        module = modules[name]
        if isinstance(module, AdapterLayer):
            plans[name] = LayerPlan(type(module), parts)
        elif isinstance(module, nn.Embedding):
            plans[name] = LayerPlan(LoRAEmbedding, parts, {"tied_head": _is_tied_to_head(model, module)})
        elif isinstance(module, CONV_TYPES):
            plans[name] = LayerPlan(LoRAConv, parts)
        else:
            plans[name] = LayerPlan(LoRALinear, parts)
    return plans


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


def inject_adapter(model: nn.Module, plan: AdapterPlan, adapter_name: str, config: LoraConfig,
                   state: AdapterState) -> list[AdapterLayer]:
    """Give every module in `plan.layers` adapter `adapter_name`, wrapping it in the layer kind the
    plan chose (or adding to the adapter layer already there). `config` gives dropout,
    initialisation and the variants. The layers."""
    layers = []
    for name, target in plan.layers.items():
        module = model.get_submodule(name)
        layer = module if isinstance(module, AdapterLayer) else target.kind(module, state, **target.options)
        try:
            layer.add_adapter(
                adapter_name,
                target.parts,
                lora_dropout=config.lora_dropout,
                init_lora_weights=_layer_init(config),
                use_rslora=config.use_rslora,
                **{variant.field: getattr(config, variant.field) for variant in VARIANTS},
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if layer is not module:
            set_submodule(model, name, layer)
        if layer.fan_in_fan_out:
            config.fan_in_fan_out = True  # recorded for PEFT: GPT-2 Conv1D stores W as (in, out)
        layers.append(layer)
    return layers


def _layer_init(config: LoraConfig):
    """init_lora_weights as a layer takes it: LoftQ's iteration count rides in the name (init.py)."""
    if config.init_lora_weights == "loftq":
        return f"loftq_iter_{config.loftq_config.get('loftq_iter', 1)}"
    return config.init_lora_weights


def _is_tied_to_head(model: nn.Module, embedding: nn.Embedding) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and getattr(head, "weight", None) is embedding.weight


def trained_biases(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """The base biases an adapter with this `bias` setting trains, by parameter path (PEFT keeps
    `.base_layer.` in these keys): none, those of LoRA layers ("lora_only"), or all ("all")."""
    if bias == "none":
        return {}
    owners = {f"{p}.base_layer.bias" for p, m in walk(model) if isinstance(m, AdapterLayer)}
    return {
        path: param for path, param in model.named_parameters()
        if path.endswith("bias") and "lora_" not in path and ".modules_to_save." not in path
        and ".original_module." not in path and (bias == "all" or path in owners)
    }


def peft_reads_targets_alike(model: nn.Module, config: LoraConfig) -> bool:
    """True when PEFT, given this config's target_modules, adapts the modules minilora does
    (no role names; or role names that are also module names in this model)."""
    targets = config.target_modules
    if targets is None or isinstance(targets, str) or family_of(model) is None:
        return True
    return all(parse_selector(t) is None or has_module(model, t) for t in targets)


def adapter_layers(model: nn.Module):
    """Every adapter layer and ModulesToSave in `model`."""
    return [m for _, m in walk(model) if isinstance(m, (AdapterLayer, ModulesToSave))]
