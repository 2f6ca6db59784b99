"""The training loss of each task, as a sum over scored tokens (labels of -100 are not scored).

Summing, and dividing once by the token count of the whole global batch (trainer.py), gives the
same gradient however the batch is split into micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE


def scored_tokens(labels: torch.Tensor, task: str) -> torch.Tensor:
    """How many labels the loss scores: causal LMs predict token t+1 from t, so the first is never scored."""
    if task == "classification":
        return torch.tensor(labels.shape[0])
    if task == "seq2seq":
        return (labels != IGNORE).sum()
    return (labels[:, 1:] != IGNORE).sum()


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Σ of the per-token cross-entropies of one micro-batch, computed in fp32."""
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq2seq":  # the model shifts the labels right into its decoder inputs
        logits, targets = model(**inputs, labels=labels).logits, labels  # (B, T, V), (B, T)
    elif task == "classification":
        logits, targets = model(**inputs).logits, labels  # (B, C), (B,)
    else:
        logits = model(**inputs).logits[:, :-1]  # (B, T−1, V): position t predicts t+1
        targets = labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")

