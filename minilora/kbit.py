"""prepare_model_for_kbit_training: PEFT's preparation of a quantized model, for minilora's NF4.

    quantize_model(model, NF4Config(compute_dtype=torch.bfloat16), skip_modules=["lm_head"])
    model = prepare_model_for_kbit_training(model)   # frozen, fp32 norms, checkpointing on
    model = get_peft_model(model, LoraConfig(...))

The steps are PEFT's (`peft.prepare_model_for_kbit_training`):

1. freeze every parameter; `get_peft_model` then makes the adapter trainable;
2. cast every fp16 / bf16 parameter to fp32 (norms, embeddings, the head, biases): these small
   parameters lose the most to half precision and cost the least to keep in full. The 4-bit
   weights are untouched: a Linear4bit's codes and scales are buffers, never parameters;
3. on a quantized model, with `use_gradient_checkpointing`: make the input embeddings' output
   require grad, then turn gradient checkpointing on. Reentrant checkpointing (the default here,
   as in PEFT) backpropagates into a checkpointed block only if its input requires grad, and with
   the whole base frozen nothing else does; with `use_reentrant=False` the hook is not needed and
   not added.

Why PEFT's own function leaves checkpointing off on a minilora-quantized model: it recognises a
quantized model by the flags transformers' bitsandbytes loader sets (`is_loaded_in_4bit`,
`is_loaded_in_8bit`) or by a `quantization_method` name. `quantize_model` replaces layers in place
and sets none of them, so PEFT takes the model for a full-precision one and skips step 3 without a
word. This function looks for Linear4bit layers instead. minilora does not set those flags itself:
transformers and TRL read them as "bitsandbytes is loaded" and would take bitsandbytes' code paths.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .checkpointed_routing import enable_checkpointing
from .model import LoraModel
from .quant import Linear4bit
from .quant.bnb_layers import is_bnb

HALF = (torch.float16, torch.bfloat16)


def is_quantized(model: nn.Module) -> bool:
    """True if any layer of `model` is a minilora Linear4bit, or holds bitsandbytes' 4- or 8-bit weight
    (a model transformers loaded with BitsAndBytesConfig)."""
    return any(isinstance(m, Linear4bit) or is_bnb(getattr(m, "weight", None)) for m in model.modules())


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """Freeze `model`, cast its half-precision parameters to fp32 and, if it holds Linear4bit layers
    and `use_gradient_checkpointing`, turn on gradient checkpointing; returns `model` (changed in
    place). Call it on the HF model before `get_peft_model`, as with PEFT; given a LoraModel it
    leaves the adapters trainable. `gradient_checkpointing_kwargs` go to torch.utils.checkpoint;
    the default is `{"use_reentrant": True}`, what PEFT's empty dict gives through torch."""
    hf_model = model.get_base_model() if isinstance(model, LoraModel) else model
    if not isinstance(model, LoraModel):  # a LoraModel's base is frozen already; its adapters train
        model.requires_grad_(False)
    for p in model.parameters():  # deduplicated: a tied head and embedding stay one tensor
        if p.dtype in HALF:
            p.data = p.data.float()
    if not (use_gradient_checkpointing and is_quantized(hf_model)):
        return model
    kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
    if kwargs.get("use_reentrant", True):
        enable_input_grads(hf_model)
    enable_checkpointing(model, kwargs)  # a LoraModel's own switch keeps its routed calls' adapters too
    return model


def enable_input_grads(model: nn.Module) -> None:
    """The input embeddings' output requires grad, so reentrant checkpointing reaches the adapters."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); pass "
                        "gradient_checkpointing_kwargs={'use_reentrant': False}, which needs no input gradients")
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))

