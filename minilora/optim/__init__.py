"""Optimizers: PagedAdamW, AdamW whose state lives off the accelerator and is paged in; LoRA+ groups."""

from .loraplus import create_loraplus_optimizer
from .paged_adamw import PagedAdamW

__all__ = ["PagedAdamW", "create_loraplus_optimizer"]
