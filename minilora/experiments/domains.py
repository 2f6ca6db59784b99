"""The embedded default's many-domain strategies: one `lora_article` adapter per domain (finance,
medical, legal; corpus.DOMAINS), each watched on the same retain set.

    lora_article_domains             the three adapters trained together, in one pass over the base
                                     (train/together.py), the same rows per adapter per step
    lora_article_domains_one_by_one  the same three adapters, one run each, one after the other

Both give each adapter the same seed, initial weights, batches (`batch_size` rows of its domain per
step) and settings, so they differ only in how the work is done: the report shows each domain's
loss before and after, its retain loss, and each strategy's wall time. Saved in PEFT's format under
<out>/<strategy>/…/adapter(s); the together run also writes the tag router's routing.json.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .. import presets
from ..files import atomic_write
from ..params import count_parameters
from ..train import checkpoint
from ..train.data import ByteTokenizer, Tokens, text_windows
from ..train.together import AdapterData, TogetherTrainer, one_adapter_each
from ..train.trainer import Interrupted, Trainer, TrainConfig
from .corpus import DOMAINS, generate

NAMES = ("lora_article_domains", "lora_article_domains_one_by_one")


def keys(name: str) -> list[str]:
    """The report's rows of strategy `name`: one per domain, named as their folders."""
    return [f"{name}/{domain}" for domain in DOMAINS]


def domain_data(s, retain) -> dict[str, AdapterData]:
    """Each domain's training and held-out windows (finance's are the default's own)."""
    tokens, data = Tokens(ByteTokenizer()), {}
    for i, (domain, (templates, slots)) in enumerate(DOMAINS.items()):
        seeds = (s.seed + 2, s.seed + 3) if domain == "finance" else (s.seed + 10 + 2 * i, s.seed + 11 + 2 * i)
        train = text_windows(generate(templates, 3000, seed=seeds[0], slots=slots), tokens, s.seq_len)
        val = text_windows(generate(templates, 200, seed=seeds[1], slots=slots), tokens, s.seq_len)
        data[domain] = AdapterData(train, val, retain)
    return data


def run_domains(name: str, s, base, retain, config: TrainConfig, log: Callable[[str], None]) -> tuple[dict, dict]:
    """(report rows, curves) of strategy `name`, one row per domain (see the module docstring)."""
    out, data, start = Path(s.out) / name, domain_data(s, retain), time.perf_counter()
    results, sizes = (_together if name == NAMES[0] else _one_by_one)(out, s, base, data, config)
    seconds = time.perf_counter() - start
    rows, curves = {}, {}
    for domain, result in results.items():
        key = f"{name}/{domain}"
        rows[key] = {"domain_loss_before": result.val_loss_before, "domain_loss_after": result.val_loss_after,
                     "retain_loss_before": result.retain_loss_before, "retain_loss_after": result.retain_loss_after,
                     "trainable_params": sizes[domain][0], "total_params": sizes[domain][1], "seconds": seconds}
        curves[key] = result.history
        log(f"{key}: domain {result.val_loss_before:.3f} -> {result.val_loss_after:.3f}  retain "
            f"{result.retain_loss_before:.3f} -> {result.retain_loss_after:.3f}  ({seconds:.0f}s for the strategy)")
    return rows, curves


def _together(out: Path, s, base, data: dict, config: TrainConfig):
    torch.manual_seed(s.seed)
    model = one_adapter_each(copy.deepcopy(base), list(data), presets.article())
    together = replace(config, batch_size=config.batch_size * len(data), adapter_mix="equal")
    resume = (out / "checkpoint.pt").is_file() and not s.overwrite
    checkpoint.prepare(out, {"strategy": NAMES[0], **together.settings()}, resume, overwrite=not resume)
    result = TogetherTrainer(model, together, data, out=out, log=lambda line: None).train(resume)
    if result.stop_reason == "interrupted":
        raise Interrupted(f"interrupted during {NAMES[0]}; its checkpoint is in {out}: run the same command again")
    for domain, one in result.adapters.items():  # each adapter's result where the report looks for it
        atomic_write(out / domain / "result.json", lambda p, one=one: Path(p).write_text(json.dumps(one.to_dict())))
    total = count_parameters(model)[1]
    return result.adapters, {d: (sum(p.numel() for p in model._params[d]), total) for d in data}


def _one_by_one(out: Path, s, base, data: dict, config: TrainConfig):
    results, sizes = {}, {}
    for domain, d in data.items():
        torch.manual_seed(s.seed)
        model = one_adapter_each(copy.deepcopy(base), [domain], presets.article())
        run_dir = out / domain
        resume = (run_dir / "checkpoint.pt").is_file() and not s.overwrite
        checkpoint.prepare(run_dir, {"strategy": NAMES[1], "domain": domain, **config.settings()}, resume,
                           overwrite=not resume)
        results[domain] = Trainer(model, config, d.train, d.val, d.retain, out=run_dir, log=lambda line: None).train(resume)
        if results[domain].stop_reason == "interrupted":
            raise Interrupted(f"interrupted during {NAMES[1]}; its checkpoint is in {run_dir}: run the same command "
                              "again")
        sizes[domain] = (sum(p.numel() for p in model.parameters() if p.requires_grad), count_parameters(model)[1])
    return results, sizes
