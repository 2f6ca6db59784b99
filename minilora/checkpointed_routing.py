"""Activation checkpointing for calls that choose their adapters (adapter_names=, adapter_weights=).

A call's routing lives in the model's AdapterState only while the call runs (`LoraModel.routed`).
Non-reentrant checkpointing runs each layer's forward a second time inside the backward pass, when
the call is over: without help, that second run would see no routing and apply the model's active
adapters instead, and the gradients would belong to a different model than the loss.

torch.utils.checkpoint takes a `context_fn` for this: it is called during the forward pass and
returns two context managers, one around the first run and one around the recomputation. Ours
takes the routing at that moment and puts it back around the recomputation:

    forward:    context_fn() → (nothing, routed(routing now))
    backward:   with routed(routing then): layer forward again → the same adapters, the same rows

`LoraModel.gradient_checkpointing_enable` / `activation_checkpointing_enable` add it (non-reentrant,
transformers' default); `check` refuses a routed training call under checkpointing without it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

from torch import nn


def routing_keeper(state) -> Callable:
    """A checkpoint `context_fn` that replays `state`'s routing of the forward pass in the recomputation."""

    def context_fn():
        return contextlib.nullcontext(), _routed(state, state.routing)

    context_fn.keeps_routing = True
    return context_fn


@contextlib.contextmanager
def _routed(state, routing):
    previous, state.routing = state.routing, routing
    try:
        yield
    finally:
        state.routing = previous


def with_keeper(kwargs, state) -> dict:
    """Checkpoint kwargs (transformers' `*_checkpointing_kwargs`) with the routing keeper added:
    non-reentrant unless asked otherwise (reentrant checkpointing takes no context_fn)."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if not kwargs["use_reentrant"] and "context_fn" not in kwargs:
        kwargs["context_fn"] = routing_keeper(state)
    return kwargs


def check(model: nn.Module) -> None:
    """Refuse a routed training call on `model` (the transformers model) if a layer is checkpointed
    without the routing keeper: its recomputation would run other adapters than the forward pass."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = func.keywords if isinstance(func, functools.partial) else {}
        if not getattr(keywords.get("context_fn"), "keeps_routing", False):
            raise ValueError(
                "training with adapter_names= or adapter_weights= under gradient checkpointing needs the call's "
                "adapters kept for the recomputation: turn checkpointing on through the LoraModel "
                "(model.gradient_checkpointing_enable() or TrainConfig(gradient_checkpointing=True)), "
                "non-reentrant; a custom context_fn or use_reentrant=True cannot keep them")


def enable_checkpointing(model: nn.Module, kwargs: dict, **options) -> None:
    """transformers' switch: `activation_checkpointing_enable` (v5), `gradient_checkpointing_enable` before."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
    else:
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing switch (a transformers "
                        "PreTrainedModel has one); pass use_gradient_checkpointing=False")
