"""TrainConfig: every setting of a training run (each also a flag of `minilora finetune`), and
the checks that refuse a setting out of range with the setting, its flag, the value and what is
accepted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from .. import renamed
from . import fsdp
from .preference import PreferenceSettings
from .setting_checks import check_count, check_numbers
from .tasks import FILE_TASKS, TASKS, task_named

OPTIMIZERS = ("adamw", "paged_adamw")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")
ADAPTER_MIXES = ("proportional", "equal")


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
    chunked_loss: bool = True  # a causal LM's loss over chunks of tokens, never all logits at once (chunked_loss.py)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass (non-reentrant)
    adapter_mix: str = "proportional"  # adapters trained together (--adapters): each one's rows per step,
    # proportional to its training examples | equal
    # the settings only the task has: its settings class (a dict of its fields is taken too), e.g.
    # PreferenceSettings(loss="ipo", beta=0.5) for task="preference"; None: the class's defaults
    task_settings: Any = None
    progress: Optional[bool] = field(default=None, metadata={"renamed_to": "progressbar"})  # the earlier name
    # the preference settings' earlier place, kept for one release: TrainConfig(loss=, beta=, ...)
    loss: Optional[str] = field(default=None, metadata={"moved_to": "task_settings"})
    beta: Optional[float] = field(default=None, metadata={"moved_to": "task_settings"})
    label_smoothing: Optional[float] = field(default=None, metadata={"moved_to": "task_settings"})
    simpo_gamma: Optional[float] = field(default=None, metadata={"moved_to": "task_settings"})
    precompute_ref: Optional[bool] = field(default=None, metadata={"moved_to": "task_settings"})

    def __post_init__(self):
        self.progressbar = renamed.earlier_keyword("TrainConfig", "progress", "progressbar", self.progress,
                                                   self.progressbar, stacklevel=4)
        self.progress = None
        self.task_settings = self._task_settings()

    def _task_settings(self):
        """The task's settings object, from `task_settings` (an object or a dict) and the earlier keywords."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)
                 if "moved_to" in f.metadata and getattr(self, f.name) is not None}
        for name in moved:
            setattr(self, name, None)
        settings_class = getattr(TASKS.get(self.task), "settings_class", None)
        if moved:
            keywords = ", ".join(f"{k}=..." for k in moved)
            warnings.warn(f"TrainConfig({keywords}) is now TrainConfig(task_settings=PreferenceSettings({keywords})): "
                          "the preference settings live with their task; the old keywords go in the next release",
                          FutureWarning, stacklevel=4)
            if settings_class is not PreferenceSettings:
                raise ValueError(f"{', '.join(moved)} belong to task='preference' (its PreferenceSettings), not to "
                                 f"task={self.task!r}; leave them out, or set task='preference'")
        given = self.task_settings
        if settings_class is None:
            if given is not None:
                raise ValueError(f"task={self.task!r} has no settings of its own; leave task_settings out (tasks "
                                 f"that have them: {', '.join(n for n, t in TASKS.items() if t.settings_class)})")
            return None
        if given is None:
            given = settings_class()
        elif isinstance(given, dict):
            names = {f.name for f in fields(settings_class)}
            unknown = sorted(given.keys() - names)
            if unknown:
                raise ValueError(f"task_settings: {', '.join(unknown)} is not a setting of task={self.task!r}; its "
                                 f"settings are {', '.join(sorted(names))}")
            given = settings_class(**given)
        elif not isinstance(given, settings_class):
            raise TypeError(f"task_settings for task={self.task!r} must be a {settings_class.__name__} (or a dict "
                            f"of its fields), got {type(given).__name__}")
        return replace(given, **moved)

    def settings(self) -> dict:
        """The values that decide what a run computes (all but the progress bar), the task's own settings
        among them: what a resumed run must match."""
        general = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("progressbar", "progress", "task_settings") and "moved_to" not in f.metadata}
        for same_numbers in ("chunked_loss", "gradient_checkpointing"):  # the same losses either way: a run
            general.pop(same_numbers)  # may resume with the other
        return {**general, **(asdict(self.task_settings) if self.task_settings is not None else {})}

    def check(self) -> None:
        """Refuse a setting that is unknown, out of its range (see RANGES and COUNTS) or not finite, with
        the setting, its flag, the value and what is accepted. The CLI and `Trainer` both call it."""
        if self.task not in FILE_TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(FILE_TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.adapter_mix not in ADAPTER_MIXES:
            raise ValueError(f"unknown adapter_mix {self.adapter_mix!r}; choose from {', '.join(ADAPTER_MIXES)}")
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
        check_numbers(self, RANGES)
        if self.task_settings is not None:
            self.task_settings.check()


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


