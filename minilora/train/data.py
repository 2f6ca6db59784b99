"""Training data: text and JSON-lines files turned into equal-length rows of token ids.

Four tasks, one row layout (N examples, T = seq_len tokens; labels of -100 are not scored):

    domain          plain text, cut into windows     input_ids (N, T), labels (N, T) = input_ids
    instruction     {"instruction", "input"?, "output"} in the template below; labels only on the
                    output tokens, the prompt masked with -100

The causal tasks begin a text with the tokenizer's start token when it has one (LLaMA's <s>).
    classification  {"text", "label"}                input_ids (N, T), labels (N,) class indices
    seq2seq         {"source", "target"}             input_ids (N, T), labels (N, T) target ids
    preference      {"prompt", "chosen", "rejected"} input_ids (N, 2, T): row 0 prompt + chosen,
                    row 1 prompt + rejected (each response ends with <eos>); labels only on the
                    response tokens, as for instruction

The instruction template (the "Input:" line only when the example has an input):

    Instruction: {instruction}
    Input: {input}
    Output: {output}<eos>

Tokenizers: the model's own, from its local directory, or `ByteTokenizer` (256 byte values) for
models built from a config.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch


IGNORE = -100  # label value that the loss skips
TASKS = ("domain", "instruction", "classification", "seq2seq", "preference")
CAUSAL_TASKS = ("domain", "instruction")  # the tasks a causal LM trains on; retain text and replay fit them
FIELDS = {  # required JSON fields per task, and optional ones
    "domain": (("text",), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "classification": (("text", "label"), ()),
    "seq2seq": (("source", "target"), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
}
LM_TASKS = CAUSAL_TASKS + ("preference",)  # the tasks of a causal LM: their retain set is plain text
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")


class ByteTokenizer:
    """Text ↔ bytes. Vocabulary: 256 byte values. Works for any text, needs no files. It answers
    the few calls minilora makes of a Hugging Face tokenizer, so both go through one code path."""

    vocab_size = 256
    eos_token_id = None  # no markers: a byte stream has no special tokens
    pad_token_id = 0

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class DataError(ValueError):
    """Training data that cannot be used, with the file (and line) and what to do."""


class Tokens:
    """One interface over a Hugging Face tokenizer or the byte-level one: text → list of ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        plain, marked = self.encode("a"), self.encode("a", special=True)
        # the token the model expects before a text (LLaMA's <s>), when its markers are only that
        self.bos_id = marked[0] if len(marked) == len(plain) + 1 and marked[1:] == plain else None

    def start(self) -> list[int]:
        """[bos] for tokenizers that mark the start of a text, else nothing."""
        return [self.bos_id] if self.bos_id is not None else []

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; with `special`, the model's own markers ([CLS] … [SEP], … </s>)."""
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]


def load_tokenizer(model_dir: Union[str, Path, None], kind: str = "auto") -> Tokens:
    """The tokenizer saved with a model (`kind="auto"`), or the byte-level one (`kind="bytes"`)."""
    if kind == "bytes" or model_dir is None:
        return Tokens(ByteTokenizer())
    if kind != "auto":
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'auto' (the model's own) or 'bytes'")
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(
            f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer with the "
            "model, or pass --tokenizer bytes to use byte-level tokens (the model needs vocab_size >= 256)"
        )
    from transformers import AutoTokenizer

    return Tokens(AutoTokenizer.from_pretrained(model_dir))


@dataclass
class Examples:
    """Rows of equal length: `tensors` maps input_ids/attention_mask/labels to (N, …) tensors."""

    tensors: dict[str, torch.Tensor]
    task: str
    label_names: Optional[list[str]] = None  # classification: the name of each class index

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def split(self, fraction: float, seed: int = 0) -> tuple["Examples", "Examples"]:
        """(training, validation) with round(N · fraction) rows held out. Windows of one text are
        held out from its end (neighbouring windows would leak into each other); the examples of
        a .jsonl file are independent, so they are held out at random (seeded), whatever their order."""
        n_val = max(1, round(len(self) * fraction))
        if len(self) - n_val < 1:
            raise DataError(f"{len(self)} example(s) cannot be split into training and validation; add data or "
                            "pass a validation file")
        order = (torch.arange(len(self)) if self.task == "domain"
                 else torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)))
        keep, held = order[:-n_val].sort().values, order[-n_val:].sort().values
        return (Examples(self.rows(keep), self.task, self.label_names),
                Examples(self.rows(held), self.task, self.label_names))


def read_text(path: Union[str, Path]) -> str:
    """A .txt file's text, or the "text" fields of a .jsonl file joined by blank lines."""
    path = _existing(path)
    if path.suffix == ".jsonl":
        return "\n\n".join(record["text"] for _, record in read_jsonl(path, ("text",)))
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"{path} is empty: put the training text in it")
    return text


def read_jsonl(path: Union[str, Path], required: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """(line number, record) for every non-blank line; a clear error for the first bad one."""
    path = _existing(path)
    records = []
    for number, line in enumerate(io.StringIO(read_utf8(path), newline=None), 1):  # lines as open() splits them
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); each line "
                            "must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in required if k not in record]
        if missing:
            wanted = ", ".join(repr(k) for k in required) + "".join(f" (optional {k!r})" for k in optional)
            raise DataError(f"{path} line {number}: missing field {missing[0]!r}; each example needs {wanted}")
        records.append((number, record))
    if not records:
        raise DataError(f"{path} is empty: expected one JSON object per line")
    return records


def read_utf8(path: Union[str, Path]) -> str:
    """A file's text, decoded as UTF-8 (a leading byte-order mark dropped). Bytes that are not UTF-8 are
    refused with the file, the line and the column of the first one."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, line_start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                        f"{e.start - line_start + 1} of the line: {e.reason}); save the file as UTF-8, or remove "
                        "or replace that byte") from None
    return text[1:] if text.startswith("\ufeff") else text


def _existing(path: Union[str, Path]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt (plain text) or .jsonl "
                        "(one JSON object per line)")
    return path


def text_windows(text: str, tokens: Tokens, seq_len: int, source: str = "text") -> Examples:
    """Every full, non-overlapping window of seq_len tokens: the causal-LM rows of plain text."""
    ids = torch.tensor(tokens.start() + tokens.encode(text), dtype=torch.long)
    if len(ids) < seq_len:
        raise DataError(f"{source} has {len(ids)} tokens, fewer than one sequence of {seq_len}; add text or lower "
                        "--seq-len")
    n = len(ids) // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)  # (N, T)
    return Examples({"input_ids": windows, "attention_mask": torch.ones_like(windows), "labels": windows.clone()},
                    "domain")


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The template up to and including "Output: "; the model learns what follows."""
    prompt = f"Instruction: {instruction}\n"
    if input_text:
        prompt += f"Input: {input_text}\n"
    return prompt + "Output: "


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def load_examples(path: Union[str, Path], task: str, tokens: Tokens, seq_len: int,
                  label_names: Optional[list[str]] = None) -> Examples:
    """A data file as rows for `task` (see the module docstring for the formats)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    path = _existing(path)
    if task == "domain":
        return text_windows(read_text(path), tokens, seq_len, str(path))
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: {task} data must be .jsonl with the fields "
                        f"{', '.join(FIELDS[task][0])} on every line")
    records = read_jsonl(path, *FIELDS[task])
    if task == "instruction":
        return _instruction_rows(path, records, tokens, seq_len)
    if task == "classification":
        return _classification_rows(path, records, tokens, seq_len, label_names)
    if task == "preference":
        from .preference import preference_rows  # the pairs' own module

        return preference_rows(path, records, tokens, seq_len)
    return _seq2seq_rows(records, tokens, seq_len)


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
    return Examples({"input_ids": _pad(ids, seq_len, tokens.pad_id), "attention_mask": _pad(mask, seq_len, 0),
                     "labels": _pad(labels, seq_len, IGNORE)}, "instruction")


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
    return Examples({"input_ids": _pad(ids, seq_len, tokens.pad_id), "attention_mask": _pad(mask, seq_len, 0),
                     "labels": torch.tensor([index[str(x)] for x in raw])}, "classification", label_names)


def _seq2seq_rows(records, tokens: Tokens, seq_len: int) -> Examples:
    sources = [tokens.encode(r["source"], special=True)[:seq_len] for _, r in records]
    targets = [tokens.encode(r["target"], special=True)[:seq_len] for _, r in records]
    mask = [[1] * len(row) for row in sources]
    return Examples({"input_ids": _pad(sources, seq_len, tokens.pad_id), "attention_mask": _pad(mask, seq_len, 0),
                     "labels": _pad(targets, seq_len, IGNORE)}, "seq2seq")


def retain_examples(path: Union[str, Path], task: str, tokens: Tokens, seq_len: int,
                    label_names: Optional[list[str]] = None) -> Examples:
    """The retain set (or replay set): plain text as causal-LM windows for the causal tasks, else the
    task's own format (the old task's held-out examples)."""
    path = _existing(path)
    if task in LM_TASKS:
        return text_windows(read_text(path), tokens, seq_len, str(path))
    return load_examples(path, task, tokens, seq_len, label_names)
