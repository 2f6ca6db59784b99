"""Preference tuning (`task="preference"`): DPO, IPO or SimPO on pairs of answers to one prompt.

The reference policy of DPO and IPO is not a second model: it is the same model with other adapters
acting (reference.py), under torch.no_grad() and in eval mode (no dropout: one fixed function):

    reference="base"          log π_ref(y|x) = log π(y|x) inside `model.disable_adapter()`: the
                              model before training, when the adapter starts from zero
    reference="adapter:NAME"  log π_ref(y|x) = log π(y|x) with adapter NAME alone: the fine-tuned
                              (SFT) model; a copy of NAME, or a new adapter on top of it, trains

either in every step, beside the policy's forward pass, or once for the whole training set before
the first step (`precompute_ref`). A sequence's log-probability sums the response tokens only
(the prompt is masked as in instruction tuning):

    log π(y|x) = Σ_{t ∈ response} log softmax(logits_{t−1})[y_t]

Legend: P pairs; S = 2P sequences (row 2p is pair p's chosen answer, row 2p + 1 its rejected one);
T tokens; V vocabulary. Packed pairs (packing.pack_pairs, `--pack`) are rows (M, 2T) holding whole
pairs back to back; their SEQUENCE tensor says which answer each token is, and a pair's log-prob
sums its tokens' over it (`pair_sums`): the same numbers as padded rows, the pairs in the order of
their index in the data.

Metrics per evaluation, over the validation pairs (r is the loss's implicit reward: β·(log π −
log π_ref) for DPO and IPO, β·log π / |y| for SimPO):

    val_loss         mean loss per pair
    reward_margin    mean of r(y_w) − r(y_l)
    reward_accuracy  fraction of pairs with r(y_w) > r(y_l) (0 before training, where every r is 0)
    choice_accuracy  fraction of pairs with log π(y_w|x) > log π(y_l|x): which answer the model itself
                     finds likelier (meaningful before training too)
    chosen_logps     mean log π(y_w|x); rejected_logps: mean log π(y_l|x)
    kl               mean over response tokens of KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), the exact KL of
                     the next-token distributions along the data's responses (nats per token)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import chunked_loss
from . import reference as reference_policy
from .chunked_loss import causal_lm_hidden
from .data import IGNORE, DataError, Examples, Tokens, model_inputs
from .distributed import Processes, all_reduce_sum
from .loss import PREFERENCE_LOSSES, dpo_loss, ipo_loss, simpo_loss
from .packing import SEQUENCE
from .setting_checks import check_numbers
from .task import Task

REFERENCE_FREE = ("simpo",)  # losses that need no reference policy


@dataclass
class PreferenceSettings:
    """The settings only preference tuning has (`TrainConfig.task_settings` with `task="preference"`);
    each is also a flag of `minilora finetune --task preference`."""

    loss: str = "dpo"  # dpo | ipo | simpo (reference-free)
    beta: float = 0.1  # β, how far the policy may move from the reference (SimPO: the reward scale)
    label_smoothing: float = 0.0  # dpo: the probability ε that a pair's label is flipped (conservative DPO)
    simpo_gamma: float = 0.5  # simpo: γ, the target reward margin
    precompute_ref: bool = False  # reference log-probs computed once before training, not in every step
    reference: str = "base"  # base: the adapters off | adapter:NAME: the frozen adapter NAME (reference.py)
    policy: str = "copy"  # with adapter:NAME, what trains: copy (a copy of NAME) | stack (a new adapter on top)
    reference_pass: str = "separate"  # with adapter:NAME: separate (a no-grad pass, then the policy's) | mixed
    # (policy and reference rows in one forward, adapter_names=; policy copy, no dropout; reference.py)

    def check(self) -> None:
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {self.loss!r}; choose from {', '.join(PREFERENCE_LOSSES)}")
        check_numbers(self, RANGES)
        reference_policy.check(self.reference, self.policy, self.reference_pass)


RANGES = {  # as TrainConfig's RANGES: (lowest, highest, (lowest allowed?, highest allowed?), what it is)
    "beta": (0.0, math.inf, (False, False), "how strongly the preference loss scales the log-ratios; DPO's "
             "usual 0.1"),
    "label_smoothing": (0.0, 0.5, (True, False), "the probability that a label is flipped"),
    "simpo_gamma": (0.0, math.inf, (True, False), "SimPO's target reward margin"),
}


class Preference(Task):
    """Pairs of answers to one prompt, the preferred one first; the loss is the objective's below."""

    name = "preference"
    fields = (("prompt", "chosen", "rejected"), ())
    replays_text = False  # a batch holds pairs (N, 2, T); plain text has no place in it
    runs_under_fsdp = False  # its evaluation gives processes unequal work (see TrainConfig.check)
    settings_class = PreferenceSettings

    def records_to_rows(self, path, records, tokens, seq_len, label_names) -> Examples:
        return preference_rows(path, records, tokens, seq_len)

    def scored_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor(labels.shape[0])  # one loss per pair (padded rows, (P, 2, T))

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(pairs_in(batch))  # one loss per pair, padded or packed

    def summed_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
        raise TypeError("preference pairs are scored by their objective (PreferenceObjective, which needs the "
                        "training config for its loss and β): use Preference.objective(model, config, procs)")

    def objective(self, model: nn.Module, config, procs: Processes) -> "PreferenceObjective":
        return PreferenceObjective(model, config, procs)


# ---------------------------------------------------------------------------------------------- data
def preference_rows(path: Path, records, tokens: Tokens, seq_len: int) -> Examples:
    """(line number, {"prompt", "chosen", "rejected"}) records as rows of shape (N, 2, T); pairs whose
    two answers are identical carry no preference: they are left out, with a warning that counts them."""
    ids, labels, identical, cut = [], [], [], []
    eos = [tokens.eos_id] if tokens.eos_id is not None else []
    for number, r in records:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(r[key], str):
                raise DataError(f"{path} line {number}: {key!r} must be a string, got {type(r[key]).__name__}")
        if r["chosen"] == r["rejected"]:
            identical.append(number)
            continue
        prompt = tokens.start() + tokens.encode(r["prompt"])
        pair_ids, pair_labels = [], []
        for answer in (r["chosen"], r["rejected"]):
            response = tokens.encode(answer) + eos
            pair_ids.append((prompt + response)[:seq_len])
            pair_labels.append(([IGNORE] * len(prompt) + response)[:seq_len])
        if len(prompt) >= seq_len:
            cut.append((number, len(prompt), max(len(row) for row in pair_ids)))
        ids.append(pair_ids)
        labels.append(pair_labels)
    if identical:
        shown = ", ".join(map(str, identical[:5])) + (" …" if len(identical) > 5 else "")
        warnings.warn(f"{path}: {len(identical)} pair(s) have identical chosen and rejected answers (line {shown}); "
                      "they carry no preference and are left out", stacklevel=3)
    if cut:
        need = max(n_prompt for _, n_prompt, _ in cut) + 1
        raise DataError(f"{path}: in {len(cut)} pair(s) (first at line {cut[0][0]}) --seq-len {seq_len} cuts the "
                        f"answers to nothing, the prompt alone filling the sequence; raise --seq-len to at least "
                        f"{need} (one answer token), or shorten those prompts")
    if not ids:
        raise DataError(f"{path}: no usable pairs (every pair's chosen and rejected answers are identical)")
    return Examples({"input_ids": _padded(ids, seq_len, tokens.pad_id),
                     "attention_mask": _padded([[[1] * len(row) for row in pair] for pair in ids], seq_len, 0),
                     "labels": _padded(labels, seq_len, IGNORE)}, "preference")


def _padded(pairs: list[list[list[int]]], length: int, value: int) -> torch.Tensor:
    """(N, 2, T) from N pairs of token lists, each padded on the right to `length`."""
    return torch.tensor([[row + [value] * (length - len(row)) for row in pair] for pair in pairs], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- log-probs
def pair_sums(batch: dict[str, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """(P, 2): per-position `values` (one per token of the flattened rows, S·T or M·2T) summed over each
    pair's chosen and rejected answer."""
    if SEQUENCE not in batch:  # padded: (P, 2, T) rows
        return values.view(*batch["input_ids"].shape[:2], -1).sum(-1)
    sequence = batch[SEQUENCE].flatten()  # (M·2T,): 2·pair + answer, −1 padding
    real = sequence >= 0
    _, local = torch.unique(torch.div(sequence[real], 2, rounding_mode="floor"), return_inverse=True)
    slot = torch.full_like(sequence, -1)
    slot[real] = 2 * local + sequence[real] % 2  # the pair's place in this batch (by its index), its answer
    kept = slot >= 0
    sums = torch.zeros(2 * (int(local.max()) + 1 if len(local) else 0), dtype=values.dtype, device=values.device)
    return sums.index_add_(0, slot[kept], values[kept]).view(-1, 2)


def pairs_in(batch: dict[str, torch.Tensor]) -> int:
    """P: how many pairs a batch holds, padded or packed."""
    if SEQUENCE not in batch:
        return batch["input_ids"].shape[0]
    sequence = batch[SEQUENCE]
    return len(torch.unique(torch.div(sequence[sequence >= 0], 2, rounding_mode="floor")))


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], keep_logits: bool = False,
                   chunked: bool = False) -> tuple[torch.Tensor, ...]:
    """(log π(y|x) (P, 2) fp32, response token counts (P, 2)) of each pair's chosen and rejected answer,
    both in one forward pass of S = 2P rows (or M packed rows); with `keep_logits`, also what the KL
    needs of the scored positions: their fp32 logits (n_scored, V), or, `chunked`, their hidden states
    and the head (chunked_loss.py: no (S·T, V) logits at all, the log-probs computed chunk by chunk)."""
    token_logps, scored, kept = token_logprobs(model, batch, keep_logits, chunked)
    logps, counts = pair_sums(batch, token_logps), pair_sums(batch, scored.long())
    if keep_logits:
        return logps, counts, kept
    return logps, counts


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], keep_logits: bool = False,
                   chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(log p of each position's next token (n,) fp32, 0 where not scored; which are scored (n,); what
    the KL needs, see `sequence_logps`), n = S·T (padded) or M·2T (packed)."""
    if SEQUENCE in batch:  # packed: position ids restart at every answer, no attention mask
        inputs, labels = model_inputs(batch), batch["labels"]
    else:
        inputs = {"input_ids": batch["input_ids"].flatten(0, 1), "attention_mask": batch["attention_mask"].flatten(0, 1)}
        labels = batch["labels"].flatten(0, 1)  # (P, 2, T) -> (S, T)
    # position t predicts token t+1; the last position predicts nothing. Shifting the targets, not the
    # logits, keeps the logits one contiguous (S·T, V) block: no copy of the largest tensor of the step.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()  # (S·T,)
    scored = targets != IGNORE  # (S·T,)
    if chunked:
        hidden, head = causal_lm_hidden(model, inputs)
        hidden = hidden.flatten(0, 1)[scored]  # (n_scored, H)
        token_logps = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
        token_logps = token_logps.masked_scatter(scored, chunked_loss.token_logps(hidden, head, targets[scored]))
        kept = (hidden, head)
    else:
        logits = model(**inputs).logits.flatten(0, 1).float()  # (S·T, V)
        token_logps = -F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")  # 0 where ignored
        kept = logits[scored] if keep_logits else None  # (n_scored, V)
    return token_logps, scored, kept


def as_reference(model: nn.Module, policy: str = "base"):
    """The reference policy `policy` ("base": the adapters switched off; "adapter:NAME": adapter NAME
    alone), in eval mode, without gradients (reference.py)."""
    return reference_policy.acting(model, policy)


def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor], keep_logits: bool = False,
                    chunked: bool = False, policy: str = "base"):
    """`sequence_logps` of the reference policy `policy` (`as_reference`)."""
    with as_reference(model, policy):
        return sequence_logps(model, batch, keep_logits, chunked)  # chunked: the head in use, the original


def mixed_logps(model: nn.Module, batch: dict[str, torch.Tensor], reference: str, chunked: bool = False):
    """(the policy's `sequence_logps`, the reference's, detached) from one forward of 2P pairs: the batch
    twice, its first copy's rows with the adapter "policy", the second's with adapter NAME of
    `reference` ("adapter:NAME"; reference_pass="mixed", reference.py). Padded pairs only: packed rows
    hold several pairs, and their order is the packing's."""
    if SEQUENCE in batch:
        raise ValueError("reference_pass='mixed' takes padded pairs; packed rows (--pack) use reference_pass='separate'")
    pairs, rows = batch["input_ids"].shape[0], batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}  # (2P, 2, T)
    names = [reference_policy.POLICY] * rows + [reference_policy.adapter_of(reference)] * rows
    with model.adapters_per_row(names):
        logps, counts = sequence_logps(model, doubled, chunked=chunked)  # (2P, 2)
    return (logps[:pairs], counts[:pairs]), (logps[pairs:].detach(), counts[pairs:])


# ---------------------------------------------------------------------------------------------- the objective
class PreferenceObjective:
    """The loss of one micro-batch and the metrics of an evaluation, for the config's PreferenceSettings."""

    def __init__(self, model: nn.Module, config, procs: Processes):
        self.model, self.config, self.procs = model, config, procs
        self.settings: PreferenceSettings = config.task_settings
        self.uses_reference = self.settings.loss not in REFERENCE_FREE
        self.chunked = config.chunked_loss and chunked_loss.unavailable(model) is None  # no (S·T, V) logits
        if self.uses_reference:
            reference_policy.set_up(model, self.settings.reference, self.settings.policy)  # before the trainer lists what trains
        self.mixed = self.uses_reference and self.settings.reference_pass == "mixed"
        if self.mixed:
            reference_policy.check_mixed(model)
        if self.uses_reference and not callable(getattr(model, "disable_adapter", None)):
            raise ValueError(f"--task preference with loss {self.settings.loss!r} needs a model with an adapter: its reference "
                             "policy is the model with the adapter switched off, and this model has none to switch "
                             "off. Wrap it first (get_peft_model(model, LoraConfig(...))), or use the reference-free "
                             "loss 'simpo'")

    def prepare(self, examples: Examples) -> Examples:
        """With `precompute_ref`, the training pairs with their reference log-probs computed once:
        "ref_logps" (N, 2) of padded pairs, or, packed, "ref_token_logps" (M, 2T), each position's (a
        pair's are their sums, `pair_sums`); each process computes every world-th row, one all-reduce
        joins them."""
        if not (self.settings.precompute_ref and self.uses_reference):
            return examples
        packed = SEQUENCE in examples.tensors
        name = "ref_token_logps" if packed else "ref_logps"
        ref = torch.zeros(len(examples), examples.tensors["input_ids"].shape[-1] if packed else 2,
                          device=self.procs.device)  # (M, 2T) or (N, 2)
        rows = torch.arange(self.procs.rank, len(examples), self.procs.world)
        for i in range(0, len(rows), self.config.eval_batch_size):
            index = rows[i:i + self.config.eval_batch_size]
            batch = {k: v.to(self.procs.device) for k, v in examples.rows(index).items()}
            with as_reference(self.model, self.settings.reference):
                token_logps = token_logprobs(self.model, batch, chunked=self.chunked)[0]
            per_row = token_logps.view(len(index), -1) if packed else pair_sums(batch, token_logps)
            ref[index.to(self.procs.device)] = per_row
        ref = all_reduce_sum(ref, self.procs).cpu()
        return Examples({**examples.tensors, name: ref}, examples.task, examples.label_names)

    def stored_reference(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P, 2): the reference log-probs `prepare` stored with these pairs."""
        if "ref_token_logps" in batch:
            return pair_sums(batch, batch["ref_token_logps"].flatten())
        return batch["ref_logps"]

    def per_pair(self, batch: dict[str, torch.Tensor], keep_logits: bool = False):
        """(loss (P,), implicit reward (P, 2), policy log-probs (P, 2), KL summed over the answers' tokens
        (with `keep_logits` and a reference; else None))."""
        cfg = self.settings
        reference = None  # the reference first: its forward pass's memory is free again before the policy's
        stored = "ref_logps" in batch or "ref_token_logps" in batch
        if self.mixed and not stored and not keep_logits:  # one forward: the policy's rows, then the reference's
            policy, reference = mixed_logps(self.model, batch, cfg.reference, self.chunked)
        else:
            if self.uses_reference and (not stored or keep_logits):
                reference = reference_logps(self.model, batch, keep_logits, self.chunked, cfg.reference)
            policy = sequence_logps(self.model, batch, keep_logits, self.chunked)
        logps, counts = policy[0], policy[1]
        if cfg.loss == "simpo":
            loss = simpo_loss(logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1], cfg.beta, cfg.simpo_gamma)
            return loss, cfg.beta * logps.detach() / counts.clamp(min=1), logps, None
        ref = reference[0] if reference is not None else self.stored_reference(batch)
        if cfg.loss == "dpo":
            loss = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing)
        else:
            loss = ipo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1], cfg.beta)
        kl = None
        if keep_logits and self.chunked:  # Σ_t Σ_v π log(π / π_ref), chunk by chunk from the hidden states
            kl = chunked_loss.kl_sum(*policy[2], *reference[2])
        elif keep_logits:  # the same from the logits (n_scored, V) -> scalar
            policy_logp, ref_logp = policy[2].log_softmax(-1), reference[2].log_softmax(-1)
            kl = (policy_logp.exp() * (policy_logp - ref_logp)).sum()
        return loss, cfg.beta * (logps.detach() - ref), logps, kl

    def summed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ over the micro-batch's pairs of the loss; the trainer divides by the global pair count."""
        return self.per_pair(batch)[0].sum()

    @torch.no_grad()
    def evaluate(self, examples: Examples, autocast) -> dict[str, float]:
        """The metrics of the module docstring over `examples`, each process taking every world-th pair."""
        was_training = self.model.training
        self.model.eval()
        rows = torch.arange(self.procs.rank, len(examples), self.procs.world)
        # [Σ loss, Σ margin, Σ correct, Σ chosen log π, Σ rejected log π, Σ KL, Σ response tokens, pairs,
        #  Σ chosen likelier]
        sums = torch.zeros(9, dtype=torch.float64, device=self.procs.device)
        for i in range(0, len(rows), self.config.eval_batch_size):
            index = rows[i:i + self.config.eval_batch_size]
            batch = {k: v.to(self.procs.device) for k, v in examples.rows(index).items()}
            with autocast():
                loss, reward, logps, kl = self.per_pair(batch, keep_logits=self.uses_reference)
            margin = reward[:, 0] - reward[:, 1]  # (P,)
            parts = [loss.sum(), margin.sum(), (margin > 0).sum(), logps[:, 0].sum(), logps[:, 1].sum(),
                     kl if kl is not None else 0.0, (batch["labels"][..., 1:] != IGNORE).sum(), len(loss),
                     (logps[:, 0] > logps[:, 1]).sum()]
            sums += torch.tensor([float(x) for x in parts], dtype=torch.float64, device=sums.device)
        self.model.train(was_training)
        total = all_reduce_sum(sums, self.procs)
        pairs = total[7].item()
        return {"val_loss": total[0].item() / pairs, "reward_margin": total[1].item() / pairs,
                "reward_accuracy": total[2].item() / pairs, "choice_accuracy": total[8].item() / pairs,
                "chosen_logps": total[3].item() / pairs,
                "rejected_logps": total[4].item() / pairs,
                "kl": total[5].item() / total[6].item() if self.uses_reference else None}
