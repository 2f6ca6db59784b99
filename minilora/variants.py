"""LoRA variants: what an adapter of a LoRALinear adds to plain LoRA, behind one protocol.

A variant is switched on per adapter by a LoraConfig field of the same name (PEFT's), and owns,
for the adapters it holds:

    add(layer, name)                   its parameters, initialised (B = 0 keeps a fresh adapter a no-op)
    holds(layer, name)                 whether adapter `name` uses it
    forward(layer, name, y, weight)    y after the low-rank path -> y with the variant's part added
    fold(layer, name, sign)            merge (+1) into the base layer, or take it back out (-1)
    check_fold(layer, name)            ValueError, changing nothing, if folding would give NaN / inf
    file_tensors(layer, name, ratio)   {key suffix: tensor} under PEFT's keys (`ratio`: each part's
                                       scale over the scale of the one LoRA the file holds)
    load_file_tensors(layer, name, tensors, ratio, where)    the inverse

LoRALinear calls every registered variant at those points and knows none of them. Adding one is a
file of its own plus one line in VARIANTS.
"""

from __future__ import annotations

from .lora_bias import LoraBias

VARIANTS = (LoraBias(),)  # the registered variants, each once
