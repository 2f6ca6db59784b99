"""The registered tasks, each once, and the calls that take a task by name.

A task's file defines it (task.py: domain, instruction, classification, seq2seq; preference.py;
retention.py: an encoder's classification with replayed sentences); adding one is its file plus
one entry below. `TrainConfig.task`, `--task` and `Examples.task` hold a name from TASKS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .data import Examples, Tokens
from .preference import Preference
from .retention import EncoderReplay
from .task import Classification, Domain, Instruction, Seq2Seq, Task

TASKS: dict[str, Task] = {t.name: t for t in (Domain(), Instruction(), Classification(), Seq2Seq(), Preference(),
                                              EncoderReplay())}
FILE_TASKS = tuple(name for name, t in TASKS.items() if t.from_files)  # the choices of --task


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(FILE_TASKS)}")
    return TASKS[name]


def load_examples(path: Union[str, Path], task: str, tokens: Tokens, seq_len: int,
                  label_names: Optional[list[str]] = None) -> Examples:
    """A data file as rows for `task` (task.py's formats)."""
    if task not in FILE_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(FILE_TASKS)}")
    return TASKS[task].rows(path, tokens, seq_len, label_names)


def retain_examples(path: Union[str, Path], task: str, tokens: Tokens, seq_len: int,
                    label_names: Optional[list[str]] = None) -> Examples:
    """The retain (or replay) set for `task`: plain-text windows for a causal LM's task, else its own rows."""
    return task_named(task).retain_rows(path, tokens, seq_len, label_names)


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """`task`'s summed loss over one micro-batch (task.py)."""
    return task_named(task).summed_loss(model, batch)


def scored_tokens(labels: torch.Tensor, task: str) -> torch.Tensor:
    """How many labels `task`'s loss scores in a batch."""
    return task_named(task).scored_tokens(labels)
