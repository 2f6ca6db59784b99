"""The preference losses (DPO, IPO, SimPO) as functions of sequence log-probabilities.

Each task's own loss is its `summed_loss` (task.py): a sum over scored tokens, divided once by the
token count of the whole global batch (trainer.py), which gives the same gradient however the batch
is split into micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- preference
# Legend: P pairs; per pair, log π(y|x) = Σ over the response tokens of log π(y_t | x, y_<t), for the
# policy π (adapter on) and the reference π_ref (the same model, adapter off). w: chosen, l: rejected.
PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), per pair, shape (P,):

        h = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
        ℓ = −(1 − ε) · log σ(h) − ε · log σ(−h)

    ε (label smoothing, "conservative DPO") is the probability that a pair's label is flipped; ε = 0 is
    the paper's loss. At the start (π = π_ref) h = 0 and ℓ = log 2."""
    h = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (P,)
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """Identity Preference Optimization (Azar et al. 2023, eq. 17, τ = β), per pair, shape (P,):

        h = (log π(y_w|x) − log π_ref(y_w|x)) / |y_w| − (log π(y_l|x) − log π_ref(y_l|x)) / |y_l|
        ℓ = (h − 1 / (2β))²

    A squared loss pulls the log-ratio margin to a finite target instead of pushing it to infinity.
    Each log-ratio is divided by its response's token count |y| (the per-token average, the form the
    paper's results use), so β means the same for short and long answers."""
    h = (chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (rejected - ref_rejected) / rejected_tokens.clamp(min=1)
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Simple Preference Optimization (Meng et al. 2024, eq. 6), reference-free, per pair, shape (P,):

        h = β / |y_w| · log π(y_w|x) − β / |y_l| · log π(y_l|x) − γ
        ℓ = −log σ(h)

    The reward is the policy's own length-normalised log-probability: no reference model at all, so
    nothing keeps the policy near where it started except the learning rate and the step count
    (the difference DPO's and IPO's reference terms make). γ is the target reward margin."""
    h = beta * (chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)) - gamma
    return -F.logsigmoid(h)
