"""The embedded default fine-tune: does each strategy learn the domain, and what does it forget?

    1. pretrain a small GPT-2 on general text (it stands in for a pretrained model; cached)
    2. for each strategy, fine-tune a copy on finance text with AdamW and warmup + cosine
    3. measure domain loss (the new skill) and retain loss (held-out general text, the old
       capabilities) before and after, parameters trained, seconds and peak memory

Each fine-tune is a `Trainer` run with its own directory, so an interrupted comparison continues
where it stopped. "After" is the adapter the trainer kept: the lowest domain validation loss.

Strategies:
    full          every weight trains
    lora_all      LoRA r=8 on every Linear of every layer
    lora_article  the article's plan: Q and V of the upper half, rank rising with depth, LM head
    qlora_article the same adapters over a 4-bit NF4 base (double quant), with PagedAdamW
    dora_article  the article's plan with DoRA (a trained magnitude per row; not run by default:
                  `--strategies dora_article` adds it to an earlier report)
    <any>_replay  the same with a quarter of every batch replayed from the general text (not run
                  by default; `--strategies lora_article_replay` adds it to an earlier report)
    lora_article_dpo  lora_article's model, then DPO on finance preference pairs (answers with
                  figures preferred to vague ones), the reference being that model with the new
                  adapter switched off; reward accuracy before/after (dpo_demo.py; not run by default)

`--experiment minilm` runs the same comparison on a pretrained model and real text instead: the
sentence encoder all-MiniLM-L6-v2 learning which part of the standard library a docstring comes
from, watched for what it forgets on held-out sentences (minilm_demo.py).
"""

from __future__ import annotations

import copy
import json
import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from ..config import LoraConfig
from ..files import atomic_write
from ..model import get_peft_model
from ..params import count_parameters
from ..quant import NF4Config, quantize_model
from . import checkpoint
from .corpus import DOMAIN, GENERAL, ByteTokenizer, generate
from .data import Tokens, text_windows
from .plots import plot_curves
from .trainer import Interrupted, Trainer, TrainConfig, check_count, check_number

STRATEGIES = ("full", "lora_all", "lora_article", "qlora_article")  # the default comparison
REPLAY_RATIO = 0.25  # "<strategy>_replay": a quarter of every batch is general text
EXTRA_STRATEGIES = ("dora_article",)  # run when asked for by name
ALL_STRATEGIES = STRATEGIES + EXTRA_STRATEGIES + tuple(f"{name}_replay" for name in STRATEGIES + EXTRA_STRATEGIES)
ALL_STRATEGIES += ("lora_article_dpo",)  # lora_article, then DPO on finance preference pairs (dpo_demo.py)
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
    # sentence encoder on standard-library docstrings (minilm_demo.py)
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
    progress: bool = True  # progress bars

    def __post_init__(self):
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
            return  # its strategies are checked by the experiment (minilm_demo.py)
        unknown = [name for name in self.strategies if name not in ALL_STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}")
        if self.width % 32:
            raise ValueError(f"width must be a multiple of 32 (heads of 32), got {self.width}")


# Settings that do not change the numbers: a run with other values of these is the same run.
NOT_RUN_DEFINING = ("out", "strategies", "overwrite", "progress")


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


def _train_config(s: DemoSettings, steps: int, lr: float, paged: bool = False) -> TrainConfig:
    return TrainConfig(task="domain", steps=steps, batch_size=s.batch_size, lr=lr, eval_every=s.eval_every,
                       save_every=s.eval_every, optimizer="paged_adamw" if paged else "adamw",
                       forgetting_budget=s.forgetting_budget, progress=s.progress, seed=s.seed)


def pretrained_base(s: DemoSettings, general, retain, log) -> GPT2LMHeadModel:
    """A small GPT-2 trained on general text; cached in <out>/base so later runs skip it."""
    torch.manual_seed(s.seed)
    config = GPT2Config(n_layer=s.layers, n_embd=s.width, n_head=s.width // 32, vocab_size=ByteTokenizer.vocab_size,
                        n_positions=s.seq_len, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    key = {k: getattr(s, k) for k in ("layers", "width", "seq_len", "batch_size", "pretrain_steps", "seed")}
    cache = Path(s.out) / "base"
    if (cache / "key.json").exists() and json.loads((cache / "key.json").read_text()) == key:
        model.load_state_dict(load_file(cache / "model.safetensors"), strict=False)
        model.tie_weights()
        log(f"base model: loaded from {cache}")
        return model
    log(f"base model: pretraining {s.pretrain_steps} steps on general text")
    config = _train_config(s, s.pretrain_steps, 3e-3)
    config.eval_every = s.pretrain_steps
    Trainer(model, config, general, retain, log=lambda line: None).train()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    atomic_write(cache / "model.safetensors", lambda p: save_file(state, p))
    atomic_write(cache / "key.json", lambda p: Path(p).write_text(json.dumps(key)))
    return model


def strategy_model(name: str, base: GPT2LMHeadModel, log: Callable[[str], None] = print):
    """The model to train for one strategy, on a copy of the base; only its trainable parameters
    require grad."""
    model = copy.deepcopy(base)
    name = name.removesuffix("_replay")
    if name == "full":
        return model.requires_grad_(True)
    if name.startswith("qlora"):
        report = quantize_model(model, NF4Config(blocksize=64, double_quant=True))
        log(f"{name}: base quantized to NF4, {report.bits_per_weight:.3f} bits per weight, "
            f"{report.bytes_saved / 2**20:.1f} MB saved")
    configs = {
        "lora_all": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        "lora_article": LoraConfig.article(),
        "qlora_article": LoraConfig.article(),
        "dora_article": LoraConfig.article(use_dora=True),
    }
    if name not in configs:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(ALL_STRATEGIES)}")
    with warnings.catch_warnings(record=True) as caught:  # told once, as a log line
        warnings.simplefilter("always")
        wrapped = get_peft_model(model, configs[name])
    for w in caught:
        log(f"{name}: {w.message}")
    return wrapped


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


def run(s: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run every strategy; write <out>/report.json, <out>/curves.png and, per strategy, its run
    in <out>/<strategy>/ (checkpoint, metrics.jsonl, the adapter in PEFT's format). A strategy an
    earlier run with the same settings finished is reused (and stays in the report); one it was
    interrupted in is resumed."""
    s.check()
    if s.experiment == "minilm":
        from .minilm_demo import run as run_minilm  # imported here: it imports this module

        return run_minilm(s, log)
    out = Path(s.out)
    earlier = check_out(s)
    tokens = Tokens(ByteTokenizer())
    general = text_windows(generate(GENERAL, 6000, seed=s.seed), tokens, s.seq_len)
    retain = text_windows(generate(GENERAL, 200, seed=s.seed + 1), tokens, s.seq_len)
    domain = text_windows(generate(DOMAIN, 3000, seed=s.seed + 2), tokens, s.seq_len)
    domain_val = text_windows(generate(DOMAIN, 200, seed=s.seed + 3), tokens, s.seq_len)
    base = pretrained_base(s, general, retain, log)

    # rows that an earlier run with these settings finished are kept, whichever strategies run now
    report = {name: row for name, row in earlier.items() if (out / name / "result.json").is_file()}
    curves = {name: json.loads((out / name / "result.json").read_text())["history"] for name in report}
    for name in s.strategies:
        run_dir = out / name
        if name in report:
            log(f"{name:>13}: finished by an earlier run with these settings ({run_dir})")
            continue
        if name == "lora_article_dpo":  # preference tuning after lora_article: its own module
            from .dpo_demo import run_dpo

            reset_peak_rss()
            report[name], curves[name] = run_dpo(s, base, domain_val, retain, log)
            report[name]["peak_rss_mb"] = peak_rss_mb()
            write_report(out, report, curves, log)
            continue
        reset_peak_rss()
        start = time.perf_counter()
        torch.manual_seed(s.seed)  # each strategy's adapters start the same, whatever ran before
        model = strategy_model(name, base, log)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        config = _train_config(s, s.finetune_steps, s.lr_full if name.startswith("full") else s.lr_lora,
                               paged=name.startswith("qlora"))
        config.replay_ratio = REPLAY_RATIO if name.endswith("_replay") else 0.0
        resume = (run_dir / "checkpoint.pt").is_file() and not s.overwrite
        checkpoint.prepare(run_dir, {"strategy": name, **config.settings()}, resume,
                           overwrite=not resume)
        setup_seconds = time.perf_counter() - start
        result = Trainer(model, config, domain, domain_val, retain, replay=general, out=run_dir,
                         log=lambda line: None).train(resume)
        if result.stop_reason == "interrupted":
            write_report(out, report, curves, log)
            raise Interrupted(f"interrupted during {name}; its checkpoint is in {run_dir}: run the same command "
                              "again to continue")
        report[name] = {
            "domain_loss_before": result.val_loss_before,
            "domain_loss_after": result.val_loss_after,
            "retain_loss_before": result.retain_loss_before,
            "retain_loss_after": result.retain_loss_after,
            "trainable_params": trainable,
            "total_params": count_parameters(model)[1],
            "seconds": setup_seconds + result.seconds,
            "peak_rss_mb": peak_rss_mb(),
        }
        curves[name] = result.history
        r = report[name]
        log(f"{name:>13}: domain {r['domain_loss_before']:.3f} -> {r['domain_loss_after']:.3f}  "
            f"retain {r['retain_loss_before']:.3f} -> {r['retain_loss_after']:.3f}  "
            f"trainable {r['trainable_params']:,} / {r['total_params']:,}  {r['seconds']:.1f}s")
        write_report(out, report, curves, log)
    log(report_table(report))
    return report


def report_table(report: dict) -> str:
    """The comparison as a markdown table (the README's)."""
    lines = ["| strategy | domain loss before → after | retain loss before → after | trainable / total params "
             "| seconds | peak RSS MB |", "|---|---|---|---|---:|---:|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['domain_loss_before']:.3f} → {r['domain_loss_after']:.3f} "
                     f"| {r['retain_loss_before']:.3f} → {r['retain_loss_after']:.3f} "
                     f"| {r['trainable_params']:,} / {r['total_params']:,} | {r['seconds']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def write_report(out: Path, report: dict, curves: dict, log, **plot) -> None:
    """report.json (atomically) and curves.png; `plot`: plot_curves' titles and units."""
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if curves:
        plot_curves(curves, out / "curves.png", log, **plot)
