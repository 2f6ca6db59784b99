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

Which modules LoRA targets is targets.py's (resolve_targets, importable from here too).
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from .adapter_layer import AdapterLayer
from .config import LoraConfig
from .conv import CONV_TYPES, LoraConv
from .embedding import LoraEmbedding
from .lora import AdapterState, LoraLinear
from .experts import LoraExperts
from .modules_to_save import ModulesToSave, wrap_modules_to_save
from .targets import Plan, Walked, resolve_targets
from .trainable_tokens import TrainableTokens, add_trainable_tokens
from .variants import VARIANTS
from .roles import family_of, name_matches, parse_selector, set_submodule, walk

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # where minilora's own frames are


# Heads that PEFT trains in full for these task types, whichever of them the model has.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

ADAPTER_LAYERS = (AdapterLayer,)  # the layers that hold LoRA factors (kept for code that imported it)


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
    warn_rank_beyond_shape(layers, adapter_name)
    copies = wrap_modules_to_save(model, plan.modules_to_save, adapter_name, state)
    layers += add_trainable_tokens(model, plan.trainable_tokens, plan.tied_heads, adapter_name, state)
    return layers, copies


def warn_rank_beyond_shape(layers: list, adapter_name: str) -> None:
    """Warn when a pair's rank r exceeds min(d_in, d_out): ΔW = B·A (d_out × d_in) has rank at most
    that, so the rest of r adds parameters and no capacity."""
    over, allocated, needed = [], 0, 0
    for layer in layers:
        try:
            pairs = layer.factors(adapter_name)
        except NotImplementedError:  # a kind without (A, B) pairs (trainable tokens)
            continue
        for unit, (A, B) in pairs.items():
            if A.dim() != 2 or B.dim() != 2:
                continue
            r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
            allocated += A.numel() + B.numel()
            needed += min(r, d_in, d_out) * (d_in + d_out)
            if r > min(d_in, d_out):
                over.append((layer, unit, r, min(d_in, d_out)))
    if over:
        _, _, r, most = min(over, key=lambda item: item[3])
        warnings.warn(f"adapter {adapter_name!r}: r={r} exceeds min(d_in, d_out) of {len(over)} targeted layer(s) "
                      f"(down to {most}); the update B·A of such a layer has rank at most min(d_in, d_out), so the "
                      f"extra rank adds parameters and no capacity. This config allocates {allocated:,} adapter "
                      f"parameters where {needed:,} give the same updates: lower r to at most {most}",
                      stacklevel=_frames_to_caller())


def _frames_to_caller() -> int:
    """The warnings stacklevel of the first frame outside minilora: the user's call, however deep."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


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
    """The layer kind for each target: the adapter layer already there, LoraExperts for a module
    owning 3-D expert weights the plan names, LoraEmbedding, LoraConv or LoraLinear by base type."""
    plans: dict[str, LayerPlan] = {}
    for name, parts in targets.items():
        owner, _, parameter = name.rpartition(".")
        module = modules.get(owner)
        value = getattr(getattr(module, "base_layer", module), parameter, None)
        if name not in modules and isinstance(value, nn.Parameter) and value.dim() == 3:
            kind = type(module) if isinstance(module, AdapterLayer) else LoraExperts
            plans.setdefault(owner, LayerPlan(kind, {})).parts[parameter] = parts
            continue
        module = modules[name]
        if isinstance(module, AdapterLayer):
            plans[name] = LayerPlan(type(module), parts)
        elif isinstance(module, nn.Embedding):
            plans[name] = LayerPlan(LoraEmbedding, parts, {"tied_head": _is_tied_to_head(model, module)})
        elif isinstance(module, CONV_TYPES):
            plans[name] = LayerPlan(LoraConv, parts)
        else:
            plans[name] = LayerPlan(LoraLinear, parts)
    return plans


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
    """init_lora_weights as a layer takes it: LoftQ's iteration count rides in the name (named_init.py)."""
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
