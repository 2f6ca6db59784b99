"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

    lr(t) = lr₀ · t / w                                                   for t < w
    lr(t) = lr₀ · (m + (1 − m) · ½ · (1 + cos(π · (t − w) / (T − w))))   for w ≤ t ≤ T

w = warmup_steps, T = total_steps, m = min_lr_ratio. Warmup keeps the first updates of a fresh
adapter small while Adam's moment estimates settle; the cosine tail lets training end gently
instead of stopping at full speed.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR that warms up linearly for `warmup_steps`, then decays by a cosine to
    `min_lr_ratio` × the base rate at `total_steps`."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio))
