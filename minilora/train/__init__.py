"""Training: the learning-rate schedule and the embedded fine-tuning example."""

from .schedule import warmup_cosine

__all__ = ["warmup_cosine"]
