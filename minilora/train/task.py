"""A task: one kind of training example, from its file to its loss.

Each task is an object that owns, for its rows:

    fields                 the JSON fields a .jsonl line needs (required, optional)
    rows(path, tokens, seq_len, label_names)    a data file as Examples (data.py's row layout)
    retain_rows(...)       its retain (and replay) set: plain text windows for a causal LM's task
    scored_tokens(labels)  how many labels its loss scores
    count(batch)           what the trainer divides by (its global sum): scored_tokens of the labels;
                           preference: the pairs, which packed rows do not show in their labels
    summed_loss(model, batch, chunked)   Σ of its per-token (or per-example) losses over one micro-batch,
                           fp32; `chunked`: a causal LM's without all its logits at once (chunked_loss.py)
    objective(model, config, procs)   a stateful loss the trainer uses instead (preference: the
                           reference log-probs), or None
    task_type, model_class the PEFT task_type and the transformers Auto class of its model
    settings_class         a dataclass of the settings only this task has (TrainConfig.task_settings;
                           each field also a flag), or None

and a few facts the trainer and the job check: whether replayed text fits its batches, whether it
runs under FSDP, whether it has class labels. The tasks are registered once, in tasks.py.

The plain tasks are here (N examples, T = seq_len tokens; labels of -100 are not scored):

    domain          plain text, cut into windows     input_ids (N, T), labels (N, T) = input_ids
    instruction     {"instruction", "input"?, "output"} in data.py's template; labels only on the
                    output tokens, the prompt masked with -100
    classification  {"text", "label"}                input_ids (N, T), labels (N,) class indices
    seq2seq         {"source", "target"}             input_ids (N, T), labels (N, T) target ids

Their losses: a causal LM predicts token t+1 from t (the first label is never scored), a seq2seq
model shifts the labels into its decoder inputs itself, a classifier scores one label per example.
preference.py (pairs of answers) and retention.py (an encoder's replayed sentences) add theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .chunked_loss import causal_lm_summed_loss
from .data import IGNORE, DataError, Examples, Tokens, existing, instruction_prompt, model_inputs, pad_rows, read_jsonl, \
    read_text, text_windows


class Task:
    """The protocol (see the module docstring); the defaults are a causal LM's."""

    name: str = ""
    fields: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    task_type: str = "CAUSAL_LM"  # PEFT's task_type for its adapters
    model_class: str = "AutoModelForCausalLM"  # transformers' class that loads its model
    causal_lm: bool = True  # a causal LM's task: retain text is plain-text windows, --preset article fits
    replays_text: bool = True  # replayed plain text fits its batches (--replay-ratio)
    runs_under_fsdp: bool = True
    has_labels: bool = False  # class labels: the model gets a new head with one output per class
    from_files: bool = True  # its rows come from data files (a choice of --task)
    settings_class: Optional[type] = None  # a dataclass of the settings only this task has (TrainConfig.task_settings)

    def rows(self, path, tokens: Tokens, seq_len: int, label_names: Optional[list[str]] = None) -> Examples:
        path = existing(path)
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: {self.name} data must be .jsonl with the fields "
                            f"{', '.join(self.fields[0])} on every line")
        return self.records_to_rows(path, read_jsonl(path, *self.fields), tokens, seq_len, label_names)

    def records_to_rows(self, path: Path, records, tokens: Tokens, seq_len: int,
                        label_names: Optional[list[str]]) -> Examples:
        raise NotImplementedError

    def retain_rows(self, path, tokens: Tokens, seq_len: int, label_names: Optional[list[str]] = None) -> Examples:
        """The retain set (or replay set): plain text as causal-LM windows for a causal LM's task,
        else the task's own format (the old task's held-out examples)."""
        if self.causal_lm:
            path = existing(path)
            return text_windows(read_text(path), tokens, seq_len, str(path))
        return self.rows(path, tokens, seq_len, label_names)

    def scored_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Position t predicts t + 1, so the first label of a row is never scored."""
        return (labels[:, 1:] != IGNORE).sum()

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The number the trainer divides the summed loss by (summed over processes and micro-batches)."""
        return self.scored_tokens(batch["labels"])

    def summed_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
        """Σ of the per-token cross-entropies of one micro-batch, in fp32. `chunked`: without the (N, V)
        logits (chunked_loss.py; the caller has checked that the model allows it)."""
        if chunked:
            return causal_lm_summed_loss(model, batch)
        logits = model(**model_inputs(batch)).logits[:, :-1]  # (B, T−1, V)
        return cross_entropy_sum(logits, batch["labels"][:, 1:])

    def objective(self, model: nn.Module, config, procs):
        """A loss with state of its own, used by the trainer in place of summed_loss; None here."""
        return None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ CE over the targets that are not -100: logits (…, C) in fp32, targets (…)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


class Domain(Task):
    name = "domain"
    fields = (("text",), ())

    def rows(self, path, tokens: Tokens, seq_len: int, label_names: Optional[list[str]] = None) -> Examples:
        path = existing(path)
        return text_windows(read_text(path), tokens, seq_len, str(path))


class Instruction(Task):
    name = "instruction"
    fields = (("instruction", "output"), ("input",))

    def records_to_rows(self, path, records, tokens, seq_len, label_names) -> Examples:
        return _instruction_rows(path, records, tokens, seq_len)


class Classification(Task):
    name = "classification"
    fields = (("text", "label"), ())
    task_type, model_class = "SEQ_CLS", "AutoModelForSequenceClassification"
    causal_lm = replays_text = False
    has_labels = True

    def records_to_rows(self, path, records, tokens, seq_len, label_names) -> Examples:
        return _classification_rows(path, records, tokens, seq_len, label_names)

    def scored_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor(labels.shape[0])  # one loss per example

    def summed_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
        return cross_entropy_sum(logits, batch["labels"])  # labels (B,)


class Seq2Seq(Task):
    name = "seq2seq"
    fields = (("source", "target"), ())
    task_type, model_class = "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"
    causal_lm = replays_text = False

    def records_to_rows(self, path, records, tokens, seq_len, label_names) -> Examples:
        return _seq2seq_rows(records, tokens, seq_len)

    def scored_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE).sum()  # the model shifts the labels itself: every target token counts

    def summed_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
        labels = batch["labels"]  # (B, T): the model shifts them right into its decoder inputs
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        return cross_entropy_sum(logits, labels)


def _instruction_rows(path: Path, records, tokens: Tokens, seq_len: int) -> Examples:
    ids, labels = [], []
    for number, r in records:
        prompt = tokens.start() + tokens.encode(instruction_prompt(r["instruction"], r.get("input", "")))
        answer = tokens.encode(r["output"]) + ([tokens.eos_id] if tokens.eos_id is not None else [])
        if len(prompt) >= seq_len:
            raise DataError(f"{path} line {number}: the prompt alone is {len(prompt)} tokens, leaving no room for "
                            f"the output in a sequence of {seq_len}; raise --seq-len or shorten the example")
        row = (prompt + answer)[:seq_len]
        ids.append(row)
        labels.append(([IGNORE] * len(prompt) + answer)[:seq_len])
    mask = [[1] * len(row) for row in ids]
    return Examples({"input_ids": pad_rows(ids, seq_len, tokens.pad_id), "attention_mask": pad_rows(mask, seq_len, 0),
                     "labels": pad_rows(labels, seq_len, IGNORE)}, "instruction")


def class_names(path: Path, records) -> list[str]:
    """The name of each class index, from a training file's labels. Integer labels are class indices:
    the classifier gets one output for each of 0 … the largest. Names (strings) are sorted into indices.

    The largest index must be below the number of examples: K classes among N < K examples leave at
    least K − N of them with nothing to learn from, so such a label is a typo or a data mix-up, and
    taking it at its word would size the head (and the list of names) by the label, not by the data."""
    raw = [(number, r["label"]) for number, r in records]
    if not all(isinstance(x, int) and not isinstance(x, bool) for _, x in raw):
        return sorted({str(x) for _, x in raw})
    number, lowest = min(raw, key=lambda item: item[1])
    if lowest < 0:
        raise DataError(f"{path} line {number}: label {lowest} is negative; integer labels are class indices "
                        "0, 1, 2, …: renumber the classes from 0, or give the labels as names (strings)")
    number, largest = max(raw, key=lambda item: item[1])
    if largest >= len(raw):
        raise DataError(f"{path} line {number}: label {largest} would make {largest + 1} classes (integer labels "
                        f"are class indices 0 … the largest), but the file has only {len(raw)} example(s), so at "
                        f"least {largest + 1 - len(raw)} class(es) would have none; number the classes 0 … K−1 "
                        f"with K at most {len(raw)}, or give the labels as names (strings)")
    return [str(i) for i in range(largest + 1)]


def _classification_rows(path: Path, records, tokens: Tokens, seq_len: int,
                         label_names: Optional[list[str]]) -> Examples:
    raw = [r["label"] for _, r in records]
    if label_names is None:  # a training file: its labels decide the classes
        label_names = class_names(path, records)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = next(((number, r["label"]) for number, r in records if str(r["label"]) not in index), None)
    if unknown is not None:
        shown = ", ".join(label_names[:20]) + (f", … ({len(label_names)} in all)" if len(label_names) > 20 else "")
        raise DataError(f"{path} line {unknown[0]}: label {str(unknown[1])!r} is not one of the training labels "
                        f"({shown}); use the training file's labels")
    ids = [tokens.encode(r["text"], special=True)[:seq_len] for _, r in records]
    mask = [[1] * len(row) for row in ids]
    return Examples({"input_ids": pad_rows(ids, seq_len, tokens.pad_id), "attention_mask": pad_rows(mask, seq_len, 0),
                     "labels": torch.tensor([index[str(x)] for x in raw])}, "classification", label_names)


def _seq2seq_rows(records, tokens: Tokens, seq_len: int) -> Examples:
    sources = [tokens.encode(r["source"], special=True)[:seq_len] for _, r in records]
    targets = [tokens.encode(r["target"], special=True)[:seq_len] for _, r in records]
    mask = [[1] * len(row) for row in sources]
    return Examples({"input_ids": pad_rows(sources, seq_len, tokens.pad_id), "attention_mask": pad_rows(mask, seq_len, 0),
                     "labels": pad_rows(targets, seq_len, IGNORE)}, "seq2seq")
