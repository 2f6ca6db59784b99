"""The embedded default's DPO strategies: preference tuning after domain fine-tuning.

    lora_article_dpo           the model that `lora_article` left, its adapter (and trained LM head)
                               merged into the base; a new adapter (the article's Q and V plan, no
                               head) trains, and the reference is that adapter switched off
    lora_article_dpo_adapter   no merge: the base with the `lora_article` adapter loaded under its
                               name; the reference is that adapter (reference="adapter:lora_article"),
                               and a trainable copy of it is the policy (train/reference.py)
    qlora_article_dpo_adapter  the same after `qlora_article`, on its 4-bit NF4 base, where a merge
                               would re-quantize the weights

    1. DPO on generated finance pairs (corpus.preference_pairs: an answer with figures is preferred
       to a vague one), at a tenth of the LoRA learning rate and with a forgetting budget on the
       retain set
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
from ..quant import NF4Config, quantize_model
from ..train import checkpoint
from ..train.data import ByteTokenizer, Examples, Tokens
from .corpus import preference_pairs
from ..train.preference import PreferenceSettings, preference_rows
from ..train.trainer import Interrupted, Trainer, TrainConfig

NAME = "lora_article_dpo"
STARTS = {NAME: "lora_article", "lora_article_dpo_adapter": "lora_article",  # the strategy whose adapter DPO
          "qlora_article_dpo_adapter": "qlora_article"}  # starts from
BETA = 0.1  # DPO's β
LR_FRACTION = 0.1  # DPO's peak learning rate, as a fraction of the LoRA fine-tuning one (at 1, 25 steps of
# DPO raised the retain loss from 1.65 to 8.06 nats: DPO pushes the rejected answers down without limit)
FORGETTING_BUDGET = 0.5  # nats the retain loss may rise before the monitor stops DPO and keeps the last good step
PAIRS, HELD_OUT = 800, 100  # generated training pairs and held-out pairs


def pairs(n: int, seed: int, seq_len: int) -> Examples:
    return preference_rows(Path(f"<generated pairs, seed {seed}>"), list(enumerate(preference_pairs(n, seed), 1)),
                           Tokens(ByteTokenizer()), seq_len)


def sft_model(name: str, base, out: Path, log: Callable[[str], None]) -> torch.nn.Module:
    """Strategy `name`'s starting model: the base with the adapter of the strategy it follows merged
    in (a plain GPT-2 again, with a new adapter), or loaded under that strategy's name (on the NF4
    base for qlora_article)."""
    after = STARTS[name]
    adapter = out / after / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{name} starts from the {after} adapter, and {adapter} has none: run "
                         f"--strategies {after},{name} ({after} first)")
    model = copy.deepcopy(base)
    if after.startswith("qlora"):
        quantize_model(model, NF4Config(blocksize=64, double_quant=True))  # as qlora_article's base
    with warnings.catch_warnings(record=True) as caught:  # told once, as a log line
        warnings.simplefilter("always")
        if name == NAME:
            model = get_peft_model(LoraModel.from_pretrained(model, adapter).merge_and_unload(),
                                   presets.article(head=False))
        else:
            model = LoraModel.from_pretrained(model, adapter, adapter_name=after, is_trainable=True)
    for w in caught:
        log(f"{name}: {w.message}")
    return model


def run_dpo(name: str, s, base, domain_val: Examples, retain: Examples,
            log: Callable[[str], None]) -> tuple[dict, list]:
    """Train DPO strategy `name` (or resume it); (its report row, its evaluation history)."""
    out, run_dir = Path(s.out), Path(s.out) / name
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    model = sft_model(name, base, out, log)
    train, held_out = pairs(PAIRS, s.seed + 10, s.seq_len), pairs(HELD_OUT, s.seed + 11, s.seq_len)
    reference = "base" if name == NAME else f"adapter:{STARTS[name]}"
    config = TrainConfig(task="preference", task_settings=PreferenceSettings(loss="dpo", beta=BETA, reference=reference),
                         steps=s.finetune_steps, batch_size=s.batch_size, lr=s.lr_lora * LR_FRACTION,
                         eval_every=s.eval_every, save_every=s.eval_every, forgetting_budget=FORGETTING_BUDGET,
                         progressbar=s.progressbar, seed=s.seed, chunked_loss=False)  # as synthetic.py
    resume = (run_dir / "checkpoint.pt").is_file() and not s.overwrite
    checkpoint.prepare(run_dir, {"strategy": name, **config.settings()}, resume, overwrite=not resume)
    trainer = Trainer(model, config, train, held_out, retain, out=run_dir, log=lambda line: None)
    domain_before = trainer.evaluate(domain_val)  # the SFT model's (a fresh adapter changes nothing)
    setup_seconds = time.perf_counter() - start
    result = trainer.train(resume)
    if result.stop_reason == "interrupted":
        raise Interrupted(f"interrupted during {name}; its checkpoint is in {run_dir}: run the same command again "
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
    log(f"{name:>13}: held-out pairs: reward accuracy {row['reward_accuracy_before']:.2f} -> "
        f"{row['reward_accuracy_after']:.2f}, choice accuracy {row['choice_accuracy_before']:.2f} -> "
        f"{row['choice_accuracy_after']:.2f}, DPO loss {row['dpo_loss_before']:.3f} -> {row['dpo_loss_after']:.3f}; "
        f"domain {row['domain_loss_before']:.3f} -> {row['domain_loss_after']:.3f}; "
        f"retain {row['retain_loss_before']:.3f} -> {row['retain_loss_after']:.3f}; KL to the reference "
        f"{row['kl_after']:.3f} nats per token")
    return row, result.history
