"""Optimizers: PagedAdamW, AdamW whose state lives off the accelerator and is paged in."""

from .paged_adamw import PagedAdamW

__all__ = ["PagedAdamW"]
