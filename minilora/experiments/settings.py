"""What the embedded experiments share: their settings (every field a flag of `minilora finetune`),
the strategies, the run directory's record of settings, the report and the peak memory.

Light to import: the command line reads these before it knows which experiment runs.
"""

from __future__ import annotations

import json
import math
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .. import renamed
from ..files import atomic_write
from ..train import checkpoint
from ..train.plots import plot_curves
from ..train.setting_checks import check_count, check_number


STRATEGIES = ("full", "lora_all", "lora_article", "qlora_article")  # the default comparison
REPLAY_RATIO = 0.25  # "<strategy>_replay": a quarter of every batch is general text
EXTRA_STRATEGIES = ("dora_article",)  # run when asked for by name
ALL_STRATEGIES = STRATEGIES + EXTRA_STRATEGIES + tuple(f"{name}_replay" for name in STRATEGIES + EXTRA_STRATEGIES)
ALL_STRATEGIES += ("lora_article_dpo",  # lora_article, then DPO on finance preference pairs (dpo.py); merged,
                   "lora_article_dpo_adapter", "qlora_article_dpo_adapter")  # or against the SFT adapter itself
ALL_STRATEGIES += ("lora_article_domains",  # one lora_article adapter per domain, trained together (domains.py),
                   "lora_article_domains_one_by_one")  # or one run each
EXPERIMENTS = ("synthetic", "minilm")  # --experiment: the model and text the comparison runs on
EXPERIMENT_DEFAULTS = {  # the settings left at None take their experiment's value
    "synthetic": {"out": "runs/finetune", "seq_len": 64, "finetune_steps": 200, "eval_every": 25, "lr_full": 3e-4,
                  "lr_lora": 3e-3},
    "minilm": {"out": "runs/finetune_minilm", "seq_len": 32, "finetune_steps": 60, "eval_every": 10, "lr_full": 1e-4,
               "lr_lora": 2e-3},
}
SYNTHETIC_ONLY = {"layers": 12, "width": 96, "pretrain_steps": 600}  # settings of the GPT-2 built here, defaults


@dataclass
class DemoSettings:
    """The embedded default. Every field is a command-line flag of `minilora finetune`."""

    out: Optional[str] = None  # where report.json, curves.png and each strategy's run go (runs/finetune, or
    # runs/finetune_minilm for the minilm experiment)
    experiment: str = "synthetic"  # synthetic: a GPT-2 trained here on generated text | minilm: a pretrained
    # sentence encoder on standard-library docstrings (minilm.py)
    strategies: tuple[str, ...] = STRATEGIES  # which strategies to compare
    layers: int = SYNTHETIC_ONLY["layers"]  # GPT-2 depth
    width: int = SYNTHETIC_ONLY["width"]  # GPT-2 width (3 heads of 32)
    seq_len: Optional[int] = None  # tokens per training row (synthetic: a window of bytes, 64; minilm: a docstring, 32)
    batch_size: int = 16  # rows per step
    pretrain_steps: int = SYNTHETIC_ONLY["pretrain_steps"]  # steps of full training on general text
    finetune_steps: Optional[int] = None  # steps of fine-tuning on the domain, per strategy (synthetic 200, minilm 60)
    eval_every: Optional[int] = None  # steps between evaluations, domain and retain (synthetic 25, minilm 10)
    lr_full: Optional[float] = None  # peak learning rate for full fine-tuning (synthetic 3e-4, minilm 1e-4)
    lr_lora: Optional[float] = None  # peak learning rate for LoRA (synthetic 3e-3, minilm 2e-3)
    forgetting_budget: Optional[float] = None  # stop a strategy when its retain loss rises more; None: never
    seed: int = 0
    overwrite: bool = False  # start again when <out> holds a run with other settings
    progressbar: bool = True  # progress bars
    progress: Optional[bool] = field(default=None, metadata={"renamed_to": "progressbar"})  # the earlier name

    def __post_init__(self):
        self.progressbar = renamed.earlier_keyword("DemoSettings", "progress", "progressbar", self.progress,
                                                   self.progressbar, stacklevel=4)
        self.progress = None
        for name, value in EXPERIMENT_DEFAULTS.get(self.experiment, EXPERIMENT_DEFAULTS["synthetic"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {self.experiment!r}; choose from {', '.join(EXPERIMENTS)}")
        for name in ("layers", "width", "seq_len", "batch_size", "finetune_steps", "pretrain_steps", "eval_every"):
            check_count(name, getattr(self, name), 1, "a size or a count")
        check_count("seed", self.seed, 0, "the random seed", 2**32 - 1)
        for name in ("lr_full", "lr_lora"):
            check_number(name, getattr(self, name), 0.0, math.inf, (False, False), "a peak learning rate")
        if self.forgetting_budget is not None:
            check_number("forgetting_budget", self.forgetting_budget, 0.0, math.inf, (True, False),
                         "how far the retain loss may rise; leave it out for no budget")
        if self.experiment != "synthetic":
            changed = [name for name, value in SYNTHETIC_ONLY.items() if getattr(self, name) != value]
            if changed:
                raise ValueError(f"--{changed[0].replace('_', '-')} sets the GPT-2 that --experiment synthetic builds; "
                                 f"--experiment {self.experiment} fine-tunes a pretrained model: drop it")
            return  # its strategies are checked by the experiment (minilm.py)
        unknown = [name for name in self.strategies if name not in ALL_STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}")
        if self.width % 32:
            raise ValueError(f"width must be a multiple of 32 (heads of 32), got {self.width}")


# Settings that do not change the numbers: a run with other values of these is the same run.
NOT_RUN_DEFINING = ("out", "strategies", "overwrite", "progressbar", "progress")


def reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_out(s: DemoSettings) -> dict:
    """The report rows of an earlier run with the same settings (reused); a run with other
    settings is refused unless `overwrite`."""
    out = Path(s.out)
    defining = {k: v for k, v in asdict(s).items() if k not in NOT_RUN_DEFINING}
    record, report = out / "settings.json", out / "report.json"
    if record.is_file():
        held = json.loads(record.read_text())
        changed = checkpoint.differences(held, defining)
        if changed and not s.overwrite:
            raise checkpoint.RunDirectoryError(
                f"{out} holds a run with other settings (they differ in: {', '.join(changed)}); pass --overwrite "
                "to replace it (the cached base model is kept when it still fits), or choose another --out")
        if not changed and not s.overwrite and report.is_file():
            return json.loads(report.read_text())
    atomic_write(record, lambda p: Path(p).write_text(json.dumps(defining, indent=2)))
    return {}


def write_report(out: Path, report: dict, curves: dict, log, **plot) -> None:
    """report.json (atomically) and curves.png; `plot`: plot_curves' titles and units."""
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if curves:
        plot_curves(curves, out / "curves.png", log, **plot)
