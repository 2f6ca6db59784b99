"""What a pretrained sentence encoder knew, measured on held-out sentences: how far their embeddings
moved, and whether their nearest neighbours are still the same.

Legend: N probe sentences, T tokens, d embedding width, k neighbours. The embedding of a sentence
is the sentence-transformers one: the mean of the last hidden states over its real tokens,
scaled to unit length,

    e(x) = m / ‖m‖,   m = Σ_t mask_t · h_t / Σ_t mask_t                   h_t: last layer, token t

The original model's embeddings ê_i and neighbour lists N̂_k(i) are computed once. Then, for the
model being fine-tuned:

    cosine     = 1/N Σ_i e_i · ê_i                         1.0: every sentence embeds as before
    drift      = 1 − cosine                                0.0 unchanged; what the monitor watches
    recall@k   = 1/N Σ_i |N_k(i) ∩ N̂_k(i)| / k             N_k(i): the k sentences nearest to i
                                                           (cosine, i itself excluded)

The cosine says how far the geometry moved; recall@k says whether retrieval among these sentences
still returns what it returned before, which is what a sentence encoder is used for. A model whose
embeddings all rotate together keeps recall@k = 1 while its cosine falls; one whose embeddings
collapse toward one point can keep a high cosine while its neighbours scramble: the two together
catch both.

Replay for an encoder (the `_replay` strategies): a fraction of each batch is general sentences
whose loss is their drift from the original embedding, weighted by `REPLAY_WEIGHT`,

    loss = 1/G [ Σ_labelled CE(logits_i, y_i) + REPLAY_WEIGHT · Σ_replayed (1 − e_i · ê_i) ]

the encoder's counterpart of replaying general text with the language-model loss: the training
signal of the old data in the model's own output space. (The encoder's pretraining objective is a
contrastive loss over sentence pairs, which general text alone does not provide.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE
from .task import Classification

REPLAY_WEIGHT = 10.0  # one unit of drift (1 − cos) on a replayed sentence counts as 10 nats of domain loss
TEACHER = "teacher"  # the row field holding a replayed sentence's original embedding


def sentence_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """e(x) for each row, (N, d), in fp32; gradients flow when the caller allows them."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask,
                   output_hidden_states=True).hidden_states[-1]  # (N, T, d)
    return pooled(hidden, attention_mask)


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, unit length: (N, T, d), (N, T) -> (N, d) fp32."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N, T, d) -> (N, d)
    return F.normalize(mean.float(), dim=-1)


@torch.no_grad()
def embed_all(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              batch_size: int = 64) -> torch.Tensor:
    """e(x) of every row in eval mode, (N, d), on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = [sentence_embeddings(model, input_ids[i:i + batch_size].to(device),
                                 attention_mask[i:i + batch_size].to(device)).cpu()
             for i in range(0, len(input_ids), batch_size)]
    model.train(was_training)
    return torch.cat(parts)


def nearest_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """The k rows nearest to each row by cosine, itself excluded: (N, d) -> (N, k) indices."""
    similarity = embeddings @ embeddings.T  # (N, d) @ (d, N) -> (N, N)
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=-1).indices


def recall_at_k(neighbours: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of |N_k(i) ∩ N̂_k(i)| / k, for two (N, k) index tables."""
    shared = (neighbours.unsqueeze(-1) == reference.unsqueeze(-2)).any(-1)  # (N, k, 1) == (N, 1, k) -> (N, k)
    return shared.float().mean().item()


@dataclass
class RetentionProbe:
    """Held-out sentences and what the original model made of them. A `Trainer` given one as its
    retain set watches its drift as the retain loss (the forgetting monitor and budget use it)."""

    input_ids: torch.Tensor  # (N, T) the sentences, tokenized with the model's tokenizer
    attention_mask: torch.Tensor  # (N, T)
    reference: torch.Tensor  # (N, d) the original model's embeddings ê, unit length
    neighbours: torch.Tensor  # (N, k) the original model's nearest neighbours N̂_k
    batch_size: int = 64  # sentences per forward pass

    unit = "(1 − cos)"  # what the drift is measured in, for messages

    @classmethod
    def build(cls, original: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              k: int = 5, batch_size: int = 64) -> "RetentionProbe":
        """The probe of `original` (the model before any fine-tuning) on these sentences."""
        if not 0 < k < len(input_ids):
            raise ValueError(f"k={k} neighbours needs more than k probe sentences, got {len(input_ids)}; "
                             "lower k or add sentences")
        reference = embed_all(original, input_ids, attention_mask, batch_size)
        return cls(input_ids, attention_mask, reference, nearest_neighbours(reference, k), batch_size)

    @property
    def k(self) -> int:
        return self.neighbours.shape[1]

    def measure(self, model: nn.Module) -> dict[str, float]:
        """{"retain_loss": drift, "retain_cosine": cosine, "retain_recall": recall@k} of `model` now."""
        current = embed_all(model, self.input_ids, self.attention_mask, self.batch_size)  # (N, d)
        cosine = (current * self.reference).sum(-1).mean().item()  # (N, d)·(N, d) -> (N,) -> mean
        recall = recall_at_k(nearest_neighbours(current, self.k), self.neighbours)
        return {"retain_loss": 1.0 - cosine, "retain_cosine": cosine, "retain_recall": recall}


def replay_summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ CE over the labelled rows + REPLAY_WEIGHT · Σ (1 − e_i · ê_i) over the replayed ones (label −100,
    their original embedding ê in batch["teacher"]); see the module docstring."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    labels = batch["labels"]  # (B,)
    replayed = labels == IGNORE  # (B,)
    ce = F.cross_entropy(out.logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    if not replayed.any():
        return ce
    embedding = pooled(out.hidden_states[-1][replayed], batch["attention_mask"][replayed])  # (R, d)
    drift = 1.0 - (embedding * batch[TEACHER][replayed]).sum(-1)  # (R,)
    return ce + REPLAY_WEIGHT * drift.sum()


class EncoderReplay(Classification):
    """Classification rows with replayed sentences among them (rows with a TEACHER embedding): the
    labelled rows' cross-entropy plus REPLAY_WEIGHT times the replayed rows' drift (see above)."""

    name = "encoder_replay"
    from_files = False  # its rows are built by code (a teacher column), never read from a file

    def summed_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
        return replay_summed_loss(model, batch)
