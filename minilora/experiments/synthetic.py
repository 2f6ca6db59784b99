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
                  adapter switched off; reward accuracy before/after (dpo.py; not run by default)
    lora_article_dpo_adapter, qlora_article_dpo_adapter  the same without a merge: the reference
                  is lora_article's (qlora_article's, on its NF4 base) adapter itself, a copy trains
    lora_article_domains, lora_article_domains_one_by_one  one lora_article adapter per domain
                  (finance, medical, legal), trained together in one pass or one run each; a row
                  per domain (domains.py; not run by default)

`--experiment minilm` runs the same comparison on a pretrained model and real text instead: the
sentence encoder all-MiniLM-L6-v2 learning which part of the standard library a docstring comes
from, watched for what it forgets on held-out sentences (minilm.py).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from .. import presets
from ..config import LoraConfig
from ..files import atomic_write
from ..model import get_peft_model
from ..params import count_parameters
from ..quant import NF4Config, quantize_model
from ..train import checkpoint
from ..train.data import ByteTokenizer, Tokens, text_windows
from .corpus import DOMAIN, GENERAL, generate
from .domains import NAMES as DOMAIN_STRATEGIES, keys as domain_keys, run_domains
from .dpo import STARTS as DPO_STRATEGIES, run_dpo
from ..train.trainer import Interrupted, Trainer, TrainConfig
from .settings import ALL_STRATEGIES, REPLAY_RATIO, DemoSettings, check_out, peak_rss_mb, reset_peak_rss, write_report

def _train_config(s: DemoSettings, steps: int, lr: float, paged: bool = False) -> TrainConfig:
    return TrainConfig(task="domain", steps=steps, batch_size=s.batch_size, lr=lr, eval_every=s.eval_every,
                       save_every=s.eval_every, optimizer="paged_adamw" if paged else "adamw",
                       forgetting_budget=s.forgetting_budget, progressbar=s.progressbar, seed=s.seed,
                       chunked_loss=False)  # 256 byte tokens: nothing to chunk; docs/training-without-forgetting.md


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
        "lora_article": presets.article(),
        "qlora_article": presets.article(),
        "dora_article": presets.article(use_dora=True),
    }
    if name not in configs:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(ALL_STRATEGIES)}")
    with warnings.catch_warnings(record=True) as caught:  # told once, as a log line
        warnings.simplefilter("always")
        wrapped = get_peft_model(model, configs[name])
    for w in caught:
        log(f"{name}: {w.message}")
    return wrapped


def run(s: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run every strategy; write <out>/report.json, <out>/curves.png and, per strategy, its run
    in <out>/<strategy>/ (checkpoint, metrics.jsonl, the adapter in PEFT's format). A strategy an
    earlier run with the same settings finished is reused (and stays in the report); one it was
    interrupted in is resumed."""
    s.check()
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
        if name in DOMAIN_STRATEGIES:  # one adapter per domain, together or one by one: its own module
            if all(key in report for key in domain_keys(name)):
                log(f"{name:>13}: finished by an earlier run with these settings ({run_dir})")
                continue
            reset_peak_rss()
            rows, histories = run_domains(name, s, base, retain, _train_config(s, s.finetune_steps, s.lr_lora), log)
            report.update({key: {**row, "peak_rss_mb": peak_rss_mb()} for key, row in rows.items()})
            curves.update(histories)
            write_report(out, report, curves, log)
            continue
        if name in DPO_STRATEGIES:  # preference tuning after lora_article / qlora_article: its own module
            reset_peak_rss()
            report[name], curves[name] = run_dpo(name, s, base, domain_val, retain, log)
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
    """The comparison as a markdown table (docs/training-without-forgetting.md's)."""
    lines = ["| strategy | domain loss before → after | retain loss before → after | trainable / total params "
             "| seconds | peak RSS MB |", "|---|---|---|---|---:|---:|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['domain_loss_before']:.3f} → {r['domain_loss_after']:.3f} "
                     f"| {r['retain_loss_before']:.3f} → {r['retain_loss_after']:.3f} "
                     f"| {r['trainable_params']:,} / {r['total_params']:,} | {r['seconds']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)
