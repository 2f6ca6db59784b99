"""Training data: text and JSON-lines files, tokenizers, and the row layout every task shares.

Rows of equal length (N examples, T = seq_len tokens; labels of -100 are not scored): `Examples`
holds them as tensors with the name of their task. How each task builds its rows from a file is
the task's (task.py, preference.py); this module reads the files, tokenizes, cuts plain text into
causal-LM windows and pads. The causal tasks begin a text with the tokenizer's start token when it
has one (LLaMA's <s>). The instruction template (the "Input:" line only when the example has an
input):

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

from ..hf_dir import TOKENIZER_FILES, has_tokenizer


IGNORE = -100  # label value that the loss skips


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
    if not has_tokenizer(model_dir):
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
    path = existing(path)
    if path.suffix == ".jsonl":
        return "\n\n".join(record["text"] for _, record in read_jsonl(path, ("text",)))
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"{path} is empty: put the training text in it")
    return text


def read_jsonl(path: Union[str, Path], required: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """(line number, record) for every non-blank line; a clear error for the first bad one."""
    path = existing(path)
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


def existing(path: Union[str, Path]) -> Path:
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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model reads of a batch: input_ids, and attention_mask or (packed rows, packing.py)
    position_ids, with no cache: transformers keeps packed examples apart only without one."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return {**inputs, "use_cache": False} if "position_ids" in inputs else inputs


def pad_rows(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    """Rows of ids, each filled with `value` to `length`: (N, length)."""
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)
