"""PEFT's functions on a model's adapters, under PEFT's names and signatures:

    get_peft_model_state_dict(model, adapter_name="default")     the adapter's tensors, PEFT's file keys
    set_peft_model_state_dict(model, state_dict, adapter_name)   those tensors into an existing adapter
    load_peft_weights(directory)                                 the tensors an adapter directory holds
    inject_adapter_in_model(config, model, adapter_name)         LoRA layers in `model` itself, no wrapper
    get_model_status(model), get_layer_status(model)             what is active, merged, trainable, where

`model` is a LoraModel, or a model that `inject_adapter_in_model` gave adapters (its keys then have
no "base_model.model." prefix, as in PEFT). One difference, on purpose: `set_peft_model_state_dict`
refuses a state dict that lacks a tensor of the adapter or holds one matching nothing, with the
keys named, and then changes nothing; PEFT loads what matches and lists the rest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch import nn

from . import adapter_files
from .adapter_layer import AdapterLayer, AdapterState
from .config import LoraConfig
from .modules_to_save import ModulesToSave
from .params import count_parameters
from .roles import walk
from .state_names import LoadResult
from .surgery import apply_plan, plan_adapter, trained_biases

PREFIX = adapter_files.PREFIX  # "base_model.model.": where a LoraModel's keys start


def _holder(model: nn.Module) -> tuple[nn.Module, dict[str, LoraConfig], str]:
    """(the model whose modules carry the adapters, its configs, the key prefix it drops)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not all(isinstance(c, LoraConfig) for c in configs.values()):
        raise TypeError(f"{type(model).__name__} carries no minilora adapter: pass a LoraModel (get_peft_model) or a "
                        "model given adapters by inject_adapter_in_model")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner, configs, "" if inner is model else PREFIX


def _modules(inner: nn.Module, name: str) -> dict[str, nn.Module]:
    return {path: m for path, m in walk(inner) if isinstance(m, (AdapterLayer, ModulesToSave)) and m.has_adapter(name)}


def _parameters(module: nn.Module, name: str) -> list[nn.Parameter]:
    """What trains in adapter `name` of an adapter layer or a trained copy."""
    if isinstance(module, ModulesToSave):
        return list(module.modules_to_save[name].parameters())
    return module.adapter_parameters(name)


def _config(configs: dict[str, LoraConfig], name: str) -> LoraConfig:
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; available adapters: {sorted(configs)}")
    return configs[name]


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False,
                              save_embedding_layers: Union[bool, Literal["auto"]] = "auto") -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under the keys of its adapter_model.safetensors (the adapter's
    name left out, as PEFT writes them). `state_dict`: read the values from it (a state dict of
    `model`, e.g. gathered by a distributed wrapper) instead of from the modules."""
    model = getattr(model, "_orig_mod", model) if unwrap_compiled else model
    inner, configs, prefix = _holder(model)
    config = _config(configs, adapter_name)
    tensors, _ = adapter_files.adapter_tensors(_modules(inner, adapter_name), adapter_name, config.use_rslora,
                                               trained_biases(inner, config.bias))
    if state_dict is not None:
        own = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        named = {k: own.get(id(t)) for k, t in tensors.items()}
        tensors = {k: state_dict[n] if n in state_dict else t for (k, t), n in zip(tensors.items(), named.values())}
    return {(k[len(PREFIX):] if not prefix and k.startswith(PREFIX) else k): t.detach() for k, t in tensors.items()}


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Copy `peft_model_state_dict` (keys as get_peft_model_state_dict gives them) into the existing
    adapter `adapter_name`. All or nothing: a key missing or matching nothing, or a shape that
    differs, raises ValueError naming it, before anything is written. Returns PEFT's (missing keys:
    every other key of the model's state dict; unexpected keys: none)."""
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True would load an adapter of other shapes partly: minilora loads "
                         "an adapter whole or not at all; resize the adapter (its r) to the model's instead")
    inner, configs, prefix = _holder(model)
    config = _config(configs, adapter_name)
    tensors = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in peft_model_state_dict.items()}
    modules = _modules(inner, adapter_name)
    adapter_files.fill_adapter(modules, adapter_name, config.use_rslora, trained_biases(inner, config.bias), tensors,
                               "the state dict given")
    written = {id(p) for m in modules.values() for p in _parameters(m, adapter_name)}
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in written]
    return LoadResult(missing_keys=missing, unexpected_keys=[])


def load_peft_weights(model_id: Union[str, Path], device: Optional[str] = None, **_hub) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in the local directory `model_id`, on `device` (default: CPU)."""
    if _hub:
        raise TypeError(f"load_peft_weights reads local directories only; got hub arguments {sorted(_hub)}")
    tensors = adapter_files.read_tensors(model_id)
    return {k: v.to(device) for k, v in tensors.items()} if device else tensors


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """Put adapter `adapter_name`'s LoRA layers into `model` itself (no LoraModel around it), active
    and trainable, the rest of the model frozen; `model.peft_config` lists its adapters, as PEFT's.
    `state_dict`: tensors to fill the new adapter with (get_peft_model_state_dict's keys)."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a minilora LoraConfig, got {type(peft_config).__name__}")
    configs = model.__dict__.setdefault("peft_config", {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} is already in this model; pick another adapter_name")
    layers = [m for _, m in walk(model) if isinstance(m, (AdapterLayer, ModulesToSave))]
    state = layers[0].state if layers else AdapterState(active=[adapter_name])
    config = copy.deepcopy(peft_config)
    apply_plan(model, plan_adapter(model, config), adapter_name, config, state)
    configs[adapter_name] = config
    for p in model.parameters():
        p.requires_grad_(False)
    for m in _modules(model, adapter_name).values():
        for p in _parameters(m, adapter_name):
            p.requires_grad_(not config.inference_mode)
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict, adapter_name)
    return model


# ---------------------------------------------------------------------------------------------- status
@dataclass
class TunerLayerStatus:
    """One adapter layer (PEFT's fields)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    """The model as a whole (PEFT's fields); a value that differs between layers is "irregular"."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]] = field(default_factory=dict)
    quantization_backend: Optional[str] = None


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One TunerLayerStatus per adapter layer, by its path in the LoraModel (PEFT's names)."""
    inner, _, prefix = _holder(model)
    rows = []
    for path, layer in walk(inner):
        if not isinstance(layer, AdapterLayer):
            continue
        names = list(layer.adapter_names)
        grads = {n: _requires_grad(layer.adapter_parameters(n)) for n in names}
        devices = {n: sorted({str(p.device.type) for p in layer.adapter_parameters(n)}) for n in names}
        active = [] if layer.state.disabled else [n for n in layer.state.active if layer.has_adapter(n)]
        kind = "lora." + type(layer).__name__.removeprefix("Lora")  # PEFT's lora.Linear, lora.Embedding, ...
        rows.append(TunerLayerStatus(("model." if prefix else "") + path, kind, not layer.state.disabled, active,
                                     list(layer.merged_adapters), grads, sorted(names), devices,
                                     _quantization(layer.base_layer)))
    if not rows:
        raise ValueError("no adapter layer in this model")
    return rows


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters of the whole model: a field that all layers agree on, or "irregular"."""
    inner, configs, _ = _holder(model)
    layers = get_layer_status(model)
    trainable, total = count_parameters(model)

    def agreed(values):
        return values[0] if all(v == values[0] for v in values) else "irregular"

    grads = {}
    for name in configs:
        seen = [row.requires_grad[name] for row in layers if name in row.requires_grad]
        grads[name] = agreed(seen) if seen else False
    devices = {name: sorted({d for row in layers for d in row.devices.get(name, [])}) for name in configs}
    return TunerModelStatus(type(inner).__name__, "LoraModel", {n: "LORA" for n in configs}, trainable, total,
                            len(layers), agreed([row.enabled for row in layers]),
                            agreed([row.active_adapters for row in layers]),
                            agreed([row.merged_adapters for row in layers]), grads, sorted(configs), devices,
                            agreed([row.quantization_backend for row in layers]))


def _requires_grad(params: list[nn.Parameter]) -> Union[bool, Literal["irregular"]]:
    flags = {p.requires_grad for p in params}
    return flags.pop() if len(flags) == 1 else "irregular"


def _quantization(base: nn.Module) -> Optional[str]:
    """"bitsandbytes" for a bitsandbytes layer, "minilora" for minilora's NF4 layer, else None."""
    module = type(base).__module__
    if module.startswith("bitsandbytes"):
        return "bitsandbytes"
    return "minilora" if type(base).__name__ == "Linear4bit" else None
