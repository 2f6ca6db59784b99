"""The forgetting monitor: after each evaluation, is this the best adapter, and should training stop?

Two losses are watched. The domain validation loss says what the model learns; the retain loss
(held-out text of its old capabilities) says what it forgets:

    forgetting(t) = retain_loss(t) − retain_loss(0)          nats per token; e^forgetting is the
                                                              factor by which retain perplexity grew

For a sentence encoder the retain loss is the embedding drift of held-out sentences, 1 − mean
cosine to the original model's embeddings (retention.py): forgetting is then how much further
they moved during training, in units of (1 − cos).

Rules, in order:
    forgetting(t) > budget                        → stop ("forgetting budget"); this step is not kept
    val_loss(t) < best − min_delta                → t is the new best adapter
    no new best for `patience` evaluations        → stop ("early stop")

The best adapter is the one with the lowest validation loss among the evaluations within budget;
step 0 (the model before training) counts, so a run that only forgets keeps the original model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class Monitor:
    patience: int = 0  # evaluations without a new best before stopping; 0 never stops early
    min_delta: float = 0.0  # how much lower a validation loss must be to count as better
    forgetting_budget: Optional[float] = None  # most the retain loss may rise (nats); None: no limit
    retain_before: Optional[float] = None  # retain loss at step 0
    best_loss: float = math.inf  # lowest validation loss within budget so far
    best_step: int = 0  # ... and its step
    evals_since_best: int = 0
    stop_reason: Optional[str] = None  # set when the monitor stops training
    unit: str = "nats"  # what the retain loss is measured in, for messages ("(1 − cos)" for a probe)

    def observe(self, step: int, val_loss: float, retain_loss: Optional[float]) -> bool:
        """Record one evaluation; True when it is the new best. Sets `stop_reason` to stop."""
        if self.retain_before is None and retain_loss is not None:
            self.retain_before = retain_loss
        forgetting = self.forgetting(retain_loss)
        if self.forgetting_budget is not None and forgetting is not None and forgetting > self.forgetting_budget:
            self.stop_reason = (f"forgetting budget exceeded at step {step}: retain loss rose {forgetting:.4f} "
                                f"{self.unit} "
                                f"(budget {self.forgetting_budget}); kept the adapter of step {self.best_step}")
            return False
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_since_best = val_loss, step, 0
            return True
        self.evals_since_best += 1
        if self.patience and self.evals_since_best >= self.patience:
            self.stop_reason = (f"early stop at step {step}: validation loss has not improved for {self.patience} "
                                f"evaluations; kept the adapter of step {self.best_step} "
                                f"(validation loss {self.best_loss:.4f})")
        return False

    def forgetting(self, retain_loss: Optional[float]) -> Optional[float]:
        """How far the retain loss has risen since step 0 (None without a retain set)."""
        if retain_loss is None or self.retain_before is None:
            return None
        return retain_loss - self.retain_before

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
