"""Fine-tune, then prune — or prune, then fine-tune? Measured on the embedded default.

    python benchmarks/prune_after_finetune.py --run runs/prune/finetune

`--run` is the output directory of `minilora finetune --strategies lora_article --out DIR` (run it
first; this script reuses its pretrained base and its lora_article adapter, and rebuilds the same
data from the same seed). Rows, each with the domain loss (finance validation text, the new skill)
and the retain loss (held-out general text, the old capabilities), as the fine-tune report measures
them (mean loss per scored token):

    base                         the pretrained model, no fine-tuning
    lora_article                 the fine-tuned adapter, unmerged
    merged                       merge_and_unload
    merged → prune <variant>     50 % unstructured and 2:4, magnitude and Wanda, after merging
    merged → NF4 export          `minilora export --format nf4` and read back (load_quantized)
    merged → 2:4 wanda → NF4     both
    prune <variant> → lora_article    the base pruned first, then fine-tuned with the same budget
                                 (same config, steps, learning rate, seed, data); the adapter stays
                                 unmerged so the base keeps its zeros

Wanda's calibration: the same 8 batches of 16 windows for every variant, half from the fine-tuning
text, half from the general pretraining text (training splits, never the evaluation rows).
Writes benchmarks/results/prune_after_finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.files import atomic_write  # noqa: E402
from minilora.experiments.corpus import DOMAIN, GENERAL, generate  # noqa: E402
from minilora.train.data import ByteTokenizer, Tokens, text_windows  # noqa: E402
from minilora.experiments.synthetic import DemoSettings, pretrained_base, strategy_model  # noqa: E402
from minilora.train.tasks import scored_tokens, summed_loss  # noqa: E402
from minilora.train.trainer import Trainer, TrainConfig  # noqa: E402

VARIANTS = [("unstructured", "magnitude"), ("unstructured", "wanda"), ("2:4", "magnitude"), ("2:4", "wanda")]


@torch.no_grad()
def mean_loss(model, examples, batch_size: int = 32) -> float:
    """Mean loss per scored token, as the trainer's evaluation computes it."""
    model.eval()
    total = tokens = 0.0
    for i in range(0, len(examples), batch_size):
        batch = examples.rows(torch.arange(i, min(i + batch_size, len(examples))))
        total += summed_loss(model, batch, "domain").double().item()
        tokens += scored_tokens(batch["labels"], "domain").item()
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/prune/finetune", help="the finetune output directory")
    parser.add_argument("--part", default="all", choices=["all", "after", "before"],
                        help="which rows to run now; rows of earlier parts are kept in <run>/prune_rows.json")
    parser.add_argument("--before-variants", default="unstructured:magnitude,unstructured:wanda,2:4:magnitude,2:4:wanda",
                        help="the prune-before-fine-tuning rows, as pattern:method, comma-separated "
                        "(none:magnitude: the same training without pruning, a control)")
    args = parser.parse_args()
    run = Path(args.run)
    settings = json.loads((run / "settings.json").read_text())
    s = DemoSettings(**{k: v for k, v in settings.items() if k in DemoSettings.__dataclass_fields__},
                     out=str(run), progressbar=False)
    adapter = run / "lora_article" / "adapter"
    if args.part != "before" and not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{adapter} is missing: run `minilora finetune --strategies lora_article --out {run}` first")

    tokens = Tokens(ByteTokenizer())  # the same data as demo.run builds, from the same seeds
    general = text_windows(generate(GENERAL, 6000, seed=s.seed), tokens, s.seq_len)
    retain = text_windows(generate(GENERAL, 200, seed=s.seed + 1), tokens, s.seq_len)
    domain = text_windows(generate(DOMAIN, 3000, seed=s.seed + 2), tokens, s.seq_len)
    domain_val = text_windows(generate(DOMAIN, 200, seed=s.seed + 3), tokens, s.seq_len)
    base = pretrained_base(s, general, retain, print).eval()
    g = torch.Generator().manual_seed(1234)
    calibration = []
    for examples in (domain, general):
        for _ in range(4):
            rows = torch.randint(0, len(examples), (16,), generator=g)
            calibration.append({"input_ids": examples.tensors["input_ids"][rows]})

    saved = run / "prune_rows"  # one file per row, from every part run so far (parts may run in parallel)

    def measure(name, model, **extra):
        row = {"name": name, "domain_loss": mean_loss(model, domain_val), "retain_loss": mean_loss(model, retain),
               **extra}
        slug = "".join(c if c.isalnum() else "_" for c in name)
        atomic_write(saved / f"{slug}.json", lambda p: Path(p).write_text(json.dumps(row, indent=2)))
        print(f"{name:>36}: domain {row['domain_loss']:.4f}  retain {row['retain_loss']:.4f}", flush=True)

    if args.part in ("all", "after"):
        after(base, adapter, calibration, measure)
    if args.part in ("all", "before"):
        variants = [tuple(v.rsplit(":", 1)) for v in args.before_variants.split(",") if v]
        before(s, base, variants, calibration, (domain, domain_val, retain), measure)
    rows = {row.pop("name"): row for row in (json.loads(f.read_text()) for f in sorted(saved.glob("*.json")))}
    order = ["base", "lora_article", "merged", *[f"merged → prune {p} {m}" for p, m in VARIANTS],
             "merged → NF4 export", "merged → 2:4 wanda → NF4 export", *[f"base → prune {p} {m}" for p, m in VARIANTS],
             *[f"prune {p} {m} → lora_article" for p, m in VARIANTS], "unpruned → lora_article (this script's training)"]
    rows = {name: rows[name] for name in order if name in rows}
    write_table(rows, settings, s)


def after(base, adapter, calibration, measure) -> None:
    """The fine-tuned model, merged, then pruned or exported."""
    measure("base", base)
    tuned = ml.LoraModel.from_pretrained(copy.deepcopy(base), adapter)
    measure("lora_article", tuned)
    merged = tuned.merge_and_unload()
    measure("merged", merged)
    for pattern, method in VARIANTS:
        pruned = copy.deepcopy(merged)
        report = ml.prune(pruned, sparsity=0.5, method=method, pattern=pattern, calibration=calibration)
        changes = [layer.output_change for layer in report.layers]
        measure(f"merged → prune {pattern} {method}", pruned, sparsity=report.sparsity_reached,
                mean_output_change=sum(changes) / len(changes))
    with tempfile.TemporaryDirectory() as tmp:
        export_rows = [("merged → NF4 export", {}),
                       ("merged → 2:4 wanda → NF4 export", {"sparsity": 0.5, "pattern": "2:4", "method": "wanda"})]
        for name, pruning in export_rows:
            out = Path(tmp) / name.replace(" ", "_").replace(":", "")
            report = ml.export(tuned_model(base, adapter), out=out, format="nf4", calibration=calibration,
                               progressbar=False, print_report=False, **pruning)
            exported = ml.load_quantized(out, model_class=type(base))
            measure(name, exported, bits_per_linear_weight=report.bits_per_linear_weight,
                    bytes_ratio=report.bytes_after / report.bytes_before, sparsity=report.sparsity)


def before(s, base, variants, calibration, data, measure) -> None:
    """The base pruned first, then fine-tuned with lora_article's budget."""
    domain, domain_val, retain = data
    for pattern, method in variants:
        control = pattern == "none"  # the same training on the unpruned base: does it reproduce the fine-tune?
        name = "unpruned → lora_article (this script's training)" if control else f"prune {pattern} {method} → lora_article"
        pruned_base = copy.deepcopy(base)
        report = ml.prune(pruned_base, sparsity=0.0 if control else 0.5, method=method,
                          pattern="unstructured" if control else pattern, calibration=calibration)
        if not control:
            measure(f"base → prune {pattern} {method}", pruned_base, sparsity=report.sparsity_reached)
        torch.manual_seed(s.seed)  # the adapters start as the fine-tune's did
        model = strategy_model("lora_article", pruned_base, log=lambda line: None)
        config = TrainConfig(task="domain", steps=s.finetune_steps, batch_size=s.batch_size, lr=s.lr_lora,
                             eval_every=s.eval_every, save_every=0, progressbar=False,
                             seed=s.seed)  # the fine-tune's settings (demo.py)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(model, config, domain, domain_val, retain, out=Path(tmp), log=lambda line: None).train()
        measure(name, model, seconds=time.perf_counter() - start, sparsity=report.sparsity_reached)


def write_table(rows, settings, s) -> None:
    table = ["| model | domain loss | retain loss | notes |", "|---|---:|---:|---|"]
    for name, r in rows.items():
        notes = []
        if "sparsity" in r and r["sparsity"] is not None:
            notes.append(f"sparsity {r['sparsity']:.3f}")
        if "mean_output_change" in r:
            notes.append(f"mean layer output change {r['mean_output_change']:.3f}")
        if "bits_per_linear_weight" in r:
            notes.append(f"{r['bits_per_linear_weight']:.3f} bits per linear weight, file {r['bytes_ratio']:.3f}× fp32")
        table.append(f"| {name} | {r['domain_loss']:.4f} | {r['retain_loss']:.4f} | {', '.join(notes)} |")
    data = {"settings": settings, "finetune_steps": s.finetune_steps, "calibration": "8 batches × 16 windows "
            "(4 domain training, 4 general training)", "rows": rows}
    write_results(RESULTS / "prune_after_finetune", table, data)


def tuned_model(base, adapter):
    """A fresh LoraModel: the base with the fine-tuned adapter."""
    return ml.LoraModel.from_pretrained(copy.deepcopy(base), adapter)


if __name__ == "__main__":
    main()
