"""The embedded default's `lora_article_dpo` strategy: preference tuning after domain fine-tuning.

    1. the model that `lora_article` left: the base with its adapter (and trained LM head) merged in,
       the "SFT model" of the usual recipe
    2. a new adapter (the article's Q and V plan, no head) trained with DPO on generated finance
       pairs (corpus.preference_pairs: an answer with figures is preferred to a vague one), at a
       tenth of the LoRA learning rate and with a forgetting budget on the retain set; the
       reference is the SFT model itself, this model with the new adapter switched off
    3. reported: reward accuracy and choice accuracy on held-out pairs, the domain loss and the
       retain loss, each before and after (the forgetting monitor watches the retain set as it does
       during fine-tuning)
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .. import presets
from ..model import LoraModel, get_peft_model
from ..params import count_parameters
from ..train import checkpoint
from ..train.data import ByteTokenizer, Examples, Tokens
from .corpus import preference_pairs
from ..train.preference import PreferenceSettings, preference_rows
from ..train.trainer import Interrupted, Trainer, TrainConfig

NAME = "lora_article_dpo"
AFTER = "lora_article"  # the strategy whose adapter DPO starts from
BETA = 0.1  # DPO's β
LR_FRACTION = 0.1  # DPO's peak learning rate, as a fraction of the LoRA fine-tuning one (at 1, 25 steps of
# DPO raised the retain loss from 1.69 to 6.96 nats: DPO pushes the rejected answers down without limit)
FORGETTING_BUDGET = 0.5  # nats the retain loss may rise before the monitor stops DPO and keeps the last good step
PAIRS, HELD_OUT = 800, 100  # generated training pairs and held-out pairs


def pairs(n: int, seed: int, seq_len: int) -> Examples:
    return preference_rows(Path(f"<generated pairs, seed {seed}>"), list(enumerate(preference_pairs(n, seed), 1)),
                           Tokens(ByteTokenizer()), seq_len)


def sft_model(base, out: Path, log: Callable[[str], None]) -> torch.nn.Module:
    """The base with the lora_article adapter merged in (a plain GPT-2 again)."""
    adapter = out / AFTER / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{NAME} starts from the {AFTER} adapter, and {adapter} has none: run "
                         f"--strategies {AFTER},{NAME} ({AFTER} first)")
    with warnings.catch_warnings(record=True) as caught:  # told once, as a log line
        warnings.simplefilter("always")
        merged = LoraModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload()
    for w in caught:
        log(f"{NAME}: {w.message}")
    return merged


def run_dpo(s, base, domain_val: Examples, retain: Examples, log: Callable[[str], None]) -> tuple[dict, list]:
    """Train the strategy (or resume it); (its report row, its evaluation history)."""
    out, run_dir = Path(s.out), Path(s.out) / NAME
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    model = get_peft_model(sft_model(base, out, log), presets.article(head=False))
    train, held_out = pairs(PAIRS, s.seed + 10, s.seq_len), pairs(HELD_OUT, s.seed + 11, s.seq_len)
    config = TrainConfig(task="preference", task_settings=PreferenceSettings(loss="dpo", beta=BETA),
                         steps=s.finetune_steps, batch_size=s.batch_size, lr=s.lr_lora * LR_FRACTION,
                         eval_every=s.eval_every, save_every=s.eval_every, forgetting_budget=FORGETTING_BUDGET,
                         progressbar=s.progressbar, seed=s.seed, chunked_loss=False)  # as synthetic.py
    resume = (run_dir / "checkpoint.pt").is_file() and not s.overwrite
    checkpoint.prepare(run_dir, {"strategy": NAME, **config.settings()}, resume, overwrite=not resume)
    trainer = Trainer(model, config, train, held_out, retain, out=run_dir, log=lambda line: None)
    domain_before = trainer.evaluate(domain_val)  # the SFT model's (a fresh adapter changes nothing)
    setup_seconds = time.perf_counter() - start
    result = trainer.train(resume)
    if result.stop_reason == "interrupted":
        raise Interrupted(f"interrupted during {NAME}; its checkpoint is in {run_dir}: run the same command again "
                          "to continue")
    first = result.history[0]
    kept = next(h for h in result.history if h["step"] == result.best_step)
    row = {
        "domain_loss_before": domain_before,
        "domain_loss_after": trainer.evaluate(domain_val),  # the kept adapter's
        "retain_loss_before": result.retain_loss_before,
        "retain_loss_after": result.retain_loss_after,
        "dpo_loss_before": result.val_loss_before,
        "dpo_loss_after": result.val_loss_after,
        "reward_accuracy_before": first["reward_accuracy"],
        "reward_accuracy_after": kept["reward_accuracy"],
        "choice_accuracy_before": first["choice_accuracy"],
        "choice_accuracy_after": kept["choice_accuracy"],
        "reward_margin_after": kept["reward_margin"],
        "kl_after": kept["kl"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": count_parameters(model)[1],
        "seconds": setup_seconds + result.seconds,
    }
    log(f"{NAME:>13}: held-out pairs: reward accuracy {row['reward_accuracy_before']:.2f} -> "
        f"{row['reward_accuracy_after']:.2f}, choice accuracy {row['choice_accuracy_before']:.2f} -> "
        f"{row['choice_accuracy_after']:.2f}, DPO loss {row['dpo_loss_before']:.3f} -> {row['dpo_loss_after']:.3f}; "
        f"domain {row['domain_loss_before']:.3f} -> {row['domain_loss_after']:.3f}; "
        f"retain {row['retain_loss_before']:.3f} -> {row['retain_loss_after']:.3f}")
    return row, result.history
