"""What each optimizer step trains on: shuffled passes over the examples, with replay mixed in.

Where the data stands is two integers per source (epoch, cursor), so a checkpoint can put it back
exactly. The order of epoch e is a permutation seeded by (seed, e): it is recomputed, not stored.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class Sampler:
    """Endless shuffled passes over n examples; where it stands is (epoch, cursor)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0
        self._order: Optional[tuple[int, torch.Tensor]] = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(self.n, generator=g))
        return self._order[1]

    def take(self, k: int) -> torch.Tensor:
        """The next k indices, crossing into the next epoch (a new order) when one runs out."""
        out = []
        while k > 0:
            chunk = self._permutation()[self.cursor:self.cursor + k]
            out.append(chunk)
            k -= len(chunk)
            self.cursor += len(chunk)
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def replay_count(step: int, global_batch: int, ratio: float) -> int:
    """Replay examples in the batch of `step` (1-based): ⌊ρ·G·s⌋ − ⌊ρ·G·(s−1)⌋, so that after s steps
    exactly ⌊ρ·G·s⌋ replay examples were used, whatever G."""
    return math.floor(ratio * global_batch * step + 1e-9) - math.floor(ratio * global_batch * (step - 1) + 1e-9)
