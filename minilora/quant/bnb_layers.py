"""bitsandbytes' own 4-bit and 8-bit layers, as transformers loads them with
`BitsAndBytesConfig(load_in_4bit=True, ...)` or `(load_in_8bit=True)`: what minilora needs to count,
merge into and check them.

A bitsandbytes `Linear4bit` keeps its weight as a `Params4bit` parameter: packed codes, two 4-bit
values per byte of its storage dtype, with the scales in `weight.quant_state`. A `Linear8bitLt`
keeps an `Int8Params`: one int8 per weight and one scale per output row (`SCB`, W ≈ codes · SCB / 127).
minilora never quantizes with bitsandbytes; it only reads such a weight (dequantize) and, when an
adapter is merged into it, writes one back the way bitsandbytes builds it (requantize), as PEFT
does: the merged weight is rounded to 4 or 8 bits again, so merged outputs differ from unmerged
ones by that rounding.

bitsandbytes is imported only when a model holds such a layer; minilora does not depend on it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn


def is_bnb_4bit(weight) -> bool:
    """True for bitsandbytes' packed 4-bit parameter (Params4bit)."""
    return type(weight).__name__ == "Params4bit"


def is_bnb_8bit(weight) -> bool:
    """True for bitsandbytes' int8 parameter (Int8Params) holding codes, not fp16 weights."""
    return type(weight).__name__ == "Int8Params" and not weight.dtype.is_floating_point


def is_bnb(weight) -> bool:
    """True for a weight bitsandbytes quantized (4 or 8 bits)."""
    return is_bnb_4bit(weight) or is_bnb_8bit(weight)


def stored_values(param: torch.Tensor) -> int:
    """How many weights a parameter stands for, PEFT's rule: a Params4bit holds two 4-bit values per
    byte of its storage dtype; any other parameter, its numel."""
    if not is_bnb_4bit(param):
        return param.numel()
    storage = getattr(param, "quant_storage", torch.uint8)
    return param.numel() * 2 * torch.empty(0, dtype=storage).element_size()


def dequantize(layer: nn.Module) -> torch.Tensor:
    """W (out, in) in fp32 from a bitsandbytes Linear4bit or Linear8bitLt."""
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if is_bnb_8bit(weight):
        scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB  # (out,)
        return weight.data.float() * (scales.float().to(weight.device) / 127).view(-1, 1)
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float().reshape(layer.out_features,
                                                                                          layer.in_features)


@torch.no_grad()
def requantize(layer: nn.Module, W: torch.Tensor) -> None:
    """Give a bitsandbytes layer the quantized weight of W (out, in), built as bitsandbytes builds it:
    for a Linear8bitLt a new Int8Params (scales per row); for a Linear4bit a new Params4bit with the
    layer's own block size, quant type, double quant and storage. Either is quantized by bitsandbytes
    as it moves to the layer's device."""
    import bitsandbytes as bnb

    old = layer.weight
    if is_bnb_8bit(old):
        layer.weight = bnb.nn.Int8Params(W.to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=old.has_fp16_weights).to(old.device)
        layer.state.reset_grads()
        layer.state.SCB = None  # the new weight's scales, read from it at the next forward
        return
    accepted = set(inspect.signature(bnb.nn.Params4bit.__new__).parameters) - {"cls", "data", "requires_grad",
                                                                               "quant_state", "bnb_quantized"}
    settings = {k: v for k, v in vars(old).items() if k in accepted}
    dtype = old.quant_state.dtype if old.quant_state is not None else torch.float32
    layer.weight = bnb.nn.Params4bit(W.to("cpu", dtype), requires_grad=False, bnb_quantized=False,
                                     **settings).to(old.device)
