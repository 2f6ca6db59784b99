"""transformers' own adapter methods, on a LoraModel: what they do on a transformers model that
holds PEFT adapters, here on minilora's. Without them the calls would reach the wrapped transformers
model, which holds no PEFT adapter and answers "No adapter loaded".

    model.disable_adapters()          every adapter off (LoraModel.disable_adapter_layers)
    model.enable_adapters()           the active adapters on again (enable_adapter_layers)
    model.get_adapter_state_dict()    the active adapter's tensors (get_peft_model_state_dict)
    model.active_adapters()           the active adapters' names; `model.active_adapters` (PEFT's
                                      property) is the same list
    model.set_adapter(name)           LoraModel's own
    model.activation_checkpointing_enable(...) / gradient_checkpointing_enable(...)
                                      the transformers model's, with the per-call routing kept for
                                      the recomputation (checkpointed_routing.py)

A mixin of LoraModel (model.py), which gives it `disable_adapter_layers`, `enable_adapter_layers`
`active_adapter`, `model` and `_state`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checkpointed_routing
from .peft_functions import get_peft_model_state_dict


class ActiveAdapters(list):
    """A list of adapter names that can also be called: PEFT reads `model.active_adapters`,
    transformers calls `model.active_adapters()`; both get the names."""

    def __call__(self) -> list[str]:
        return list(self)


class TransformersAdapterMethods:
    def disable_adapters(self) -> None:
        """transformers' name for switching every adapter off: disable_adapter_layers()."""
        self.disable_adapter_layers()

    def enable_adapters(self) -> None:
        """transformers' name for switching the adapters back on: enable_adapter_layers()."""
        self.enable_adapter_layers()

    def get_adapter_state_dict(self, adapter_name: Optional[str] = None,
                               state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors (default: the active one) under its file's keys, as transformers'
        get_adapter_state_dict gives them (get_peft_model_state_dict)."""
        name = adapter_name or self.active_adapter
        if not isinstance(name, str):
            raise ValueError(f"several adapters are active ({name}): pass adapter_name= to choose one")
        return get_peft_model_state_dict(self, state_dict, adapter_name=name)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """transformers' activation checkpointing on the wrapped model, non-reentrant unless asked,
        with adapter_names= / adapter_weights= kept for the recomputation (checkpointed_routing.py)."""
        kept = checkpointed_routing.with_keeper(activation_checkpointing_kwargs, self._state)
        checkpointed_routing.enable_checkpointing(self.model, kept, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """transformers' earlier name of activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)
