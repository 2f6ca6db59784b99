"""The embedded default fine-tune: does each strategy learn the domain, and what does it forget?

    1. pretrain a small GPT-2 on general text (it stands in for a pretrained model; cached)
    2. for each strategy, fine-tune a copy on finance text with AdamW and warmup + cosine
    3. measure domain loss (the new skill) and retain loss (held-out general text, the old
       capabilities) before and after, parameters trained, seconds and peak memory

Strategies:
    full          every weight trains
    lora_all      LoRA r=8 on every Linear of every layer
    lora_article  the article's plan: Q and V of the upper half, rank rising with depth, LM head
    qlora_article the same adapters over a 4-bit NF4 base (double quant), with PagedAdamW
"""

from __future__ import annotations

import copy
import json
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
from ..io import atomic_write
from ..model import LoraModel, get_peft_model
from ..optim import PagedAdamW
from ..params import count_parameters
from ..quant import NF4Config, quantize_model
from .corpus import DOMAIN, GENERAL, ByteTokenizer, batches, generate, windows
from .schedule import warmup_cosine

STRATEGIES = ("full", "lora_all", "lora_article", "qlora_article")


@dataclass
class DemoSettings:
    """The embedded default. Every field is a command-line flag of `minilora finetune`."""

    out: str = "runs/finetune"  # where report.json, curves.png and the adapters go
    strategies: tuple[str, ...] = STRATEGIES  # which strategies to compare
    layers: int = 8  # GPT-2 depth
    width: int = 128  # GPT-2 width (4 heads of 32)
    seq_len: int = 64  # tokens (bytes) per training window
    batch_size: int = 16  # windows per step
    pretrain_steps: int = 600  # steps of full training on general text
    finetune_steps: int = 200  # steps of fine-tuning on the domain, per strategy
    eval_every: int = 25  # steps between evaluations (domain and retain)
    lr_full: float = 3e-4  # peak learning rate for full fine-tuning
    lr_lora: float = 3e-3  # peak learning rate for LoRA
    seed: int = 0


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over every window of `data` (N, T)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    model.train(was_training)
    return total / len(data)


def _train(model, params, stream, steps: int, lr: float, evaluate, eval_every: int, paged: bool = False) -> list[dict]:
    """AdamW (or PagedAdamW) + warmup/cosine + clipping; returns the eval curve."""
    optimizer = PagedAdamW(params, lr=lr, weight_decay=0.0) if paged else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, warmup_steps=max(1, steps // 10), total_steps=steps, min_lr_ratio=0.1)
    curve = [{"step": 0, **evaluate()}] if evaluate else []
    model.train()
    for step in range(1, steps + 1):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if evaluate and (step % eval_every == 0 or step == steps):
            curve.append({"step": step, "train_loss": loss.item(), **evaluate()})
    return curve


def pretrained_base(s: DemoSettings, general: torch.Tensor, log) -> GPT2LMHeadModel:
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
    stream = batches(general, s.batch_size, s.seq_len, torch.Generator().manual_seed(s.seed))
    _train(model, list(model.parameters()), stream, s.pretrain_steps, 3e-3, None, 0)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    atomic_write(cache / "model.safetensors", lambda p: save_file(state, p))
    atomic_write(cache / "key.json", lambda p: Path(p).write_text(json.dumps(key)))
    return model


def strategy_model(name: str, base: GPT2LMHeadModel, log: Callable[[str], None] = print):
    """(model, trainable params) for one strategy, on a copy of the base."""
    model = copy.deepcopy(base)
    if name == "full":
        return model, list(model.parameters())
    if name.startswith("qlora"):
        report = quantize_model(model, NF4Config(blocksize=64, double_quant=True))
        log(f"{name}: base quantized to NF4, {report.bits_per_weight:.3f} bits per weight, "
            f"{report.bytes_saved / 2**20:.1f} MB saved")
    configs = {
        "lora_all": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        "lora_article": LoraConfig.article(),
        "qlora_article": LoraConfig.article(),
    }
    if name not in configs:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    with warnings.catch_warnings(record=True) as caught:  # told once, as a log line
        warnings.simplefilter("always")
        wrapped = get_peft_model(model, configs[name])
    for w in caught:
        log(f"{name}: {w.message}")
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def run(s: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run every strategy; write <out>/report.json, <out>/curves.png and each LoRA run's adapter
    (PEFT format) in <out>/adapters/<strategy>."""
    out = Path(s.out)
    tok = ByteTokenizer()
    general = tok.encode(generate(GENERAL, 6000, seed=s.seed))
    retain = windows(tok.encode(generate(GENERAL, 300, seed=s.seed + 1)), s.seq_len)
    domain = tok.encode(generate(DOMAIN, 3000, seed=s.seed + 2))
    domain_val = windows(tok.encode(generate(DOMAIN, 300, seed=s.seed + 3)), s.seq_len)
    base = pretrained_base(s, general, log)

    def evaluate(model):
        return lambda: {"domain_loss": eval_loss(model, domain_val), "retain_loss": eval_loss(model, retain)}

    report, curves = {}, {}
    for name in s.strategies:
        torch.manual_seed(s.seed)
        _reset_peak_rss()
        start = time.perf_counter()
        model, params = strategy_model(name, base, log)
        lr = s.lr_full if name == "full" else s.lr_lora
        stream = batches(domain, s.batch_size, s.seq_len, torch.Generator().manual_seed(s.seed))
        curve = _train(model, params, stream, s.finetune_steps, lr, evaluate(model), s.eval_every,
                       paged=name.startswith("qlora"))
        total = count_parameters(model)[1]
        report[name] = {
            "domain_loss_before": curve[0]["domain_loss"],
            "domain_loss_after": curve[-1]["domain_loss"],
            "retain_loss_before": curve[0]["retain_loss"],
            "retain_loss_after": curve[-1]["retain_loss"],
            "trainable_params": sum(p.numel() for p in params),
            "total_params": total,
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": _peak_rss_mb(),
        }
        curves[name] = curve
        if isinstance(model, LoraModel):
            model.save_pretrained(out / "adapters" / name)  # PEFT's format
        r = report[name]
        log(f"{name:>13}: domain {r['domain_loss_before']:.3f} -> {r['domain_loss_after']:.3f}  "
            f"retain {r['retain_loss_before']:.3f} -> {r['retain_loss_after']:.3f}  "
            f"trainable {r['trainable_params']:,} / {r['total_params']:,}  {r['seconds']:.1f}s")

    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    atomic_write(out / "curves.json", lambda p: Path(p).write_text(json.dumps(curves)))
    atomic_write(out / "settings.json", lambda p: Path(p).write_text(json.dumps(asdict(s), indent=2)))
    plot_curves(curves, out / "curves.png", log)
    return report


def plot_curves(curves: dict, path: Path, log=print) -> Optional[Path]:
    """Domain and retain loss per strategy, side by side. Needs matplotlib; skipped without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    fig, (ax_domain, ax_retain) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for name, curve in curves.items():
        steps = [c["step"] for c in curve]
        ax_domain.plot(steps, [c["domain_loss"] for c in curve], label=name)
        ax_retain.plot(steps, [c["retain_loss"] for c in curve], label=name)
    ax_domain.set(title="domain validation loss (learn)", xlabel="step", ylabel="nats/byte")
    ax_retain.set(title="retain loss (don't forget)", xlabel="step")
    ax_domain.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path
