"""TrainConfig: every setting of a training run (each also a flag of `minilora finetune`), and
the checks that refuse a setting out of range with the setting, its flag, the value and what is
accepted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Optional

from .. import renamed
from . import fsdp
from .loss import PREFERENCE_LOSSES
from .tasks import FILE_TASKS, task_named

OPTIMIZERS = ("adamw", "paged_adamw")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Every setting of a training run; each is also a flag of `minilora finetune`."""

    task: str = "domain"  # domain | instruction | classification | seq2seq | preference
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # examples per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = -1  # linear warmup steps; −1: a tenth of `steps`
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0: no clipping
    optimizer: str = "adamw"  # adamw | paged_adamw
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: lora_B learns at lr × this (e.g. 16); None: one lr
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp32
    parallel: str = "ddp"  # under torchrun: ddp (each process holds the model) | fsdp (FSDP2 shards it; fsdp.py)
    eval_every: int = 25  # steps between evaluations
    eval_batch_size: int = 32
    save_every: int = 50  # steps between checkpoints; 0: only at the end and on Ctrl-C
    patience: int = 0  # stop after this many evaluations without a better validation loss; 0: never
    min_delta: float = 0.0  # how much better counts as better
    forgetting_budget: Optional[float] = None  # stop when the retain loss rises more (nats); None: never
    replay_ratio: float = 0.0  # fraction of each batch drawn from the replay set
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    log_every: int = 10  # steps between "train" records in metrics.jsonl
    progressbar: bool = True  # a tqdm progress bar (PEFT's word; `progress=` still works for one release)
    seed: int = 0
    loss: str = "dpo"  # preference: dpo | ipo | simpo (reference-free)
    beta: float = 0.1  # preference: β, how far the policy may move from the reference (SimPO: reward scale)
    label_smoothing: float = 0.0  # preference, dpo: probability ε that a pair's label is flipped (conservative DPO)
    simpo_gamma: float = 0.5  # preference, simpo: γ, the target reward margin
    precompute_ref: bool = False  # preference: reference log-probs computed once before training, not every step
    progress: Optional[bool] = field(default=None, metadata={"renamed_to": "progressbar"})  # the earlier name

    def __post_init__(self):
        self.progressbar = renamed.earlier_keyword("TrainConfig", "progress", "progressbar", self.progress,
                                                   self.progressbar, stacklevel=4)
        self.progress = None

    def settings(self) -> dict:
        """The fields that decide what a run computes (all but the progress bar): what a resumed run must match."""
        return {k: v for k, v in asdict(self).items() if k not in ("progressbar", "progress")}

    def check(self) -> None:
        """Refuse a setting that is unknown, out of its range (see RANGES and COUNTS) or not finite, with
        the setting, its flag, the value and what is accepted. The CLI and `Trainer` both call it."""
        if self.task not in FILE_TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(FILE_TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"unknown parallel {self.parallel!r}; choose from {', '.join(PARALLEL)}")
        if self.parallel == "fsdp" and not task_named(self.task).runs_under_fsdp:
            raise ValueError(f"--task {self.task} runs under DDP, not FSDP: its evaluation gives processes unequal "
                             "numbers of forward passes, which FSDP's per-layer gathers cannot wait out; "
                             "pass --parallel ddp")
        if self.parallel == "fsdp":
            fsdp.check_launch()
        for name, (lowest, meaning) in COUNTS.items():
            check_count(name, getattr(self, name), lowest, meaning)
        check_count("warmup_steps", self.warmup_steps, -1, "linear warmup steps; -1: a tenth of steps")
        check_count("seed", self.seed, 0, "the random seed", 2**32 - 1)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps}); give "
                             f"--warmup-steps a value in [0, {self.steps}], or -1 for a tenth of the steps")
        for name, (low, high, closed, meaning) in RANGES.items():
            if getattr(self, name) is not None:  # the optional ones: None switches them off
                check_number(name, getattr(self, name), low, high, closed, meaning)
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {self.loss!r}; choose from {', '.join(PREFERENCE_LOSSES)}")


# The numeric settings: (lowest, highest, (lowest allowed?, highest allowed?), what the number is).
# Every one must also be finite: NaN compares false with everything, so it would pass a plain
# comparison and silently switch a rule off (NaN min_delta: no step is ever better; NaN
# max_grad_norm: no clipping), and an infinite one breaks the arithmetic (infinite weight decay: every
# step non-finite).
RANGES = {
    "lr": (0.0, math.inf, (False, False), "the peak learning rate"),
    "weight_decay": (0.0, math.inf, (True, False), "AdamW's decoupled weight decay; 0: none"),
    "min_lr_ratio": (0.0, 1.0, (True, True), "the fraction of the peak learning rate the cosine ends at"),
    "max_grad_norm": (0.0, math.inf, (True, False), "the global gradient norm to clip to; 0: no clipping"),
    "loraplus_lr_ratio": (0.0, math.inf, (False, False), "lora_B's lr / lora_A's; typically 2 to 16"),
    "min_delta": (0.0, math.inf, (True, False), "how much lower a validation loss must be to count as better"),
    "forgetting_budget": (0.0, math.inf, (True, False), "how far the retain loss may rise; leave it out for no "
                          "budget"),
    "replay_ratio": (0.0, 1.0, (True, False), "the fraction of each batch drawn from the replay set"),
    "beta": (0.0, math.inf, (False, False), "how strongly the preference loss scales the log-ratios; DPO's "
             "usual 0.1"),
    "label_smoothing": (0.0, 0.5, (True, False), "the probability that a label is flipped"),
    "simpo_gamma": (0.0, math.inf, (True, False), "SimPO's target reward margin"),
}
COUNTS = {  # the whole-number settings: (lowest, what the number is)
    "steps": (1, "optimizer steps"),
    "batch_size": (1, "examples per micro-batch, per process"),
    "grad_accum": (1, "micro-batches per optimizer step"),
    "eval_every": (1, "steps between evaluations"),
    "eval_batch_size": (1, "examples per evaluation batch"),
    "max_bad_steps": (1, "consecutive non-finite steps before training stops"),
    "log_every": (1, "steps between train records"),
    "save_every": (0, "steps between checkpoints; 0: only at the end"),
    "patience": (0, "evaluations without a better validation loss before stopping; 0: never"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _rule(low: float, high: float, closed: tuple[bool, bool]) -> str:
    """'> 0', '>= 0' or 'in [0, 0.5)': the accepted values, as the messages show them."""
    if high == math.inf:
        return f"{'>=' if closed[0] else '>'} {low:g}"
    return f"in {'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"


def check_number(name: str, value, low: float, high: float, closed: tuple[bool, bool], meaning: str) -> None:
    """A finite number in the range; else a ValueError naming the setting, its flag, the value and the range."""
    rule = _rule(low, high, closed)
    fits = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and (low <= value if closed[0] else low < value) and (value <= high if closed[1] else value < high))
    if not fits:
        raise ValueError(f"{name} must be {rule} ({meaning}), got {value!r}; give {_flag(name)} a finite number "
                         f"{rule}")


def check_count(name: str, value, lowest: int, meaning: str, highest: Optional[int] = None) -> None:
    """A whole number in [lowest, highest]; else a ValueError naming the setting, its flag, the value and
    the range."""
    rule = ("> 0" if lowest == 1 else f">= {lowest}") if highest is None else f"in [{lowest}, {highest}]"
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < lowest or (highest is not None and value > highest):
        raise ValueError(f"{name} must be {rule} ({meaning}), got {value!r}; give {_flag(name)} a whole number "
                         f"{rule}")


def check_batch(config: TrainConfig, n_train: int, world: int = 1) -> None:
    """Refuse a global batch (batch_size × grad_accum × processes) larger than the training set: each step
    would repeat examples within itself, and its rows are built in memory all at once."""
    per_step = config.batch_size * config.grad_accum * world
    if per_step > n_train:
        most = n_train // (config.grad_accum * world)
        fix = (f"lower --batch-size to at most {most}" if most >= 1
               else f"lower --grad-accum (and --batch-size) so that their product times {world} process(es) is "
                    f"at most {n_train}")
        raise ValueError(f"a step takes batch_size {config.batch_size} × grad_accum {config.grad_accum} × {world} "
                         f"process(es) = {per_step} examples, more than the {n_train} training examples; {fix}, "
                         "or add data")


