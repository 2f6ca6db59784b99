"""What `inspect.signature(lora_model.forward)` shows: the wrapped model's own inputs.

A LoraModel's forward takes `*args, **kwargs` and hands them to the Hugging Face model. Tools that
feed a model decide what to pass by reading its forward's signature: transformers' `Trainer`
keeps only the batch keys that `model.forward` names (`remove_unused_columns=True`, its default),
so a bare `**kwargs` made it drop `input_ids` and `labels` alike. PEFT's models escape this because
the Trainer recognises their class and reads the wrapped model instead; minilora's answer works for
any tool: each LoraModel gets an instance-level `forward` that runs the class's forward unchanged
but whose signature is the wrapped model's, plus minilora's keyword-only `adapter_names` and
`adapter_weights`.

    inspect.signature(lora_model.forward)
    # (input_ids=None, attention_mask=None, ..., labels=None, ..., *, adapter_names=None,
    #  adapter_weights=None, **kwargs)

The wrapper is a plain function bound to the instance (the pattern accelerate uses to wrap a
model's forward), so `torch.compile(fullgraph=True)` traces through it, and `copy.deepcopy`
rebinds it to the copy.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch.nn as nn

ROUTING = ("adapter_names", "adapter_weights")  # minilora's own forward arguments


def combined_signature(model: nn.Module) -> inspect.Signature:
    """`model.forward`'s parameters, with `self` first and minilora's routing arguments added as
    keyword-only ones (before `**kwargs`, where the model has one)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a readable signature: say what the wrapper takes
        params = [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                  inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    names = {p.name for p in params}
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    routing = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ROUTING if n not in names]
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([this, *(p for p in params if p not in var_keyword), *routing, *var_keyword])


def bind_forward(module: nn.Module, model: nn.Module) -> None:
    """Give `module` an instance-level forward: its class's forward, with `combined_signature(model)`."""
    class_forward = type(module).forward

    @functools.wraps(class_forward, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    def forward(self, *args, **kwargs):
        return class_forward(self, *args, **kwargs)

    forward.__signature__ = combined_signature(model)
    module.forward = types.MethodType(forward, module)
