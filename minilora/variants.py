"""The registered LoRA variants of LoraLinear, each once; the protocol they keep is lora_variant.py.

Plain LoRA (plain_lora.py) is the path of every adapter no registered path claims. Adding a
variant is a file of its own plus one entry here (and, for PEFT's config, its LoraConfig field).
"""

from __future__ import annotations

from .dora import Dora
from .lora_bias import LoraBias
from .plain_lora import PlainLora

PLAIN = PlainLora()
VARIANTS = (Dora(), LoraBias())
