"""Parameter and state-dict names: PEFT's layout, minilora's earlier one read as it, tied
parameters under each of their names, and the base model's weights under its own keys.

A LoraModel names its parameters as `peft.get_peft_model` does with the same config:

    base_model.model.<module path>.lora_A.<adapter>.weight          a whole-layer adapter (PEFT's name)
    base_model.model.<module path>.lora_A.<adapter>.<part>.weight   a slice of a fused layer (q of c_attn),
                                                                    which PEFT cannot express
    base_model.model.<module path>.base_layer.weight                the frozen base weight

Earlier minilora releases named the same tensors `model.<module path>.lora_A.<adapter>.full.weight`.
`current_name` reads those names as today's, so state dicts and trainer checkpoints written then
still load (with a FutureWarning saying how to drop the old names). Adapter files never changed:
they always held PEFT's keys.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

WRAPPER = "base_model.model."  # the prefix of every parameter of the wrapped HF model
_EARLIER_WHOLE_LAYER = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.full\.weight$")


def current_name(name: str) -> str:
    """`name` in today's layout: `model.<path>` becomes `base_model.model.<path>`, and a whole-layer
    pair's `lora_A.<adapter>.full.weight` becomes `lora_A.<adapter>.weight`. Today's names come back
    unchanged."""
    if not name.startswith(WRAPPER) and name.startswith("model."):
        name = "base_model." + name
    return _EARLIER_WHOLE_LAYER.sub(r".\1.\2.weight", name)


def accept_earlier_names(module, state_dict: dict, prefix: str, *args) -> None:
    """A load_state_dict pre-hook: keys of the earlier layout are renamed to today's, with a warning."""
    renamed = {key: prefix + current_name(key[len(prefix):]) for key in state_dict if key.startswith(prefix)}
    renamed = {old: new for old, new in renamed.items() if old != new}
    if not renamed:
        return
    example = next(iter(renamed.items()))
    warnings.warn(f"this state dict uses minilora's earlier parameter names ({len(renamed)} keys, e.g. "
                  f"{example[0]!r}, today {example[1]!r}): they were read as today's, which are PEFT's; save "
                  "the state dict again to drop this warning", FutureWarning, stacklevel=3)
    for old, new in renamed.items():
        state_dict[new] = state_dict.pop(old)


def tied_names(module: nn.Module) -> dict[str, str]:
    """{later name: first name} for each parameter registered under more than one name (GPT-2's
    `lm_head.weight` is `transformer.wte.weight`)."""
    first: dict[int, str] = {}
    later = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        later.update({name: first[id(parameter)]} if id(parameter) in first else {})
        first.setdefault(id(parameter), name)
    return later


def fill_tied_parameters(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` takes a state dict with or without the later names of tied parameters
    (`state_dict()` lists every name, as PEFT's and torch's do; safetensors' `save_model` and
    earlier minilora releases write a tied parameter once)."""
    for name, source in tied_names(module).items():
        if prefix + name not in state_dict and prefix + source in state_dict:
            state_dict[prefix + name] = state_dict[prefix + source]


class LoadResult(NamedTuple):
    """What `load_adapter` returns, as PEFT (and torch's load_state_dict) do."""

    missing_keys: list[str]
    unexpected_keys: list[str]


_WRAPPED = re.compile(r"(^|\.)(?:token_adapter\.base_layer|base_layer|original_module)\.")  # what a wrapper inserts into a base key
_ADAPTER_WEIGHT = re.compile(r"(^|\.)(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save|trainable_tokens_delta)\.")  # weights that belong to an adapter


def _base_keys(model) -> dict[str, str]:
    """Key in the wrapped HF model's state dict -> the key it had before any adapter, for the base's own weights."""
    return {key: _WRAPPED.sub(r"\1", key) for key in model.model.state_dict() if not _ADAPTER_WEIGHT.search(key)}


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's weights under the keys it had before LoRA (no `base_layer.`, no adapter
    weights), as PEFT's function of that name. Merged adapters stay folded in."""
    state = model.model.state_dict()
    return {original: state[key] for key, original in _base_keys(model).items()}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load base weights given under the base model's own keys into a wrapped model; adapters are
    untouched. With `strict`, a missing or unknown key raises RuntimeError, as torch's load_state_dict."""
    wrapped = {original: key for key, original in _base_keys(model).items()}
    missing = [k for k in wrapped if k not in state_dict]
    unexpected = [k for k in state_dict if k not in wrapped]
    if strict and (missing or unexpected):
        raise RuntimeError(f"base model state dict does not fit: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}; pass strict=False to load the keys that fit")
    model.model.load_state_dict({wrapped[k]: v for k, v in state_dict.items() if k in wrapped}, strict=False)
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)


MAX_NAME_BYTES = 128  # an adapter's name is a folder name when saved: well under a file system's 255


def check_adapter_name(name, reserved: str) -> None:
    """An adapter's name is a module key and, saved, a folder name: one path component, not `reserved`."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if any(c in name for c in "/\\") or not name.isprintable():
        raise ValueError(f"adapter name {name!r} holds a path separator or a control character; it names "
                         "a folder when saved: use letters, digits, '-' and '_'")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"adapter name of {len(name.encode())} bytes; a saved adapter's folder name "
                         f"allows {MAX_NAME_BYTES}: pick a shorter name")
    if name == reserved:
        raise ValueError(f"{reserved!r} is reserved: in adapter_names it means 'no adapter for this row'")
