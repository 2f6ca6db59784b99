"""`minilora …` commands.

    minilora finetune                               the embedded default: general-text base, finance
                                                    fine-tune with four strategies, forgetting report
    minilora finetune --experiment minilm           the same comparison on the pretrained MiniLM and
                                                    standard-library docstrings
    minilora finetune --model DIR --data FILE …     fine-tune a local Hugging Face model with LoRA
    minilora finetune --help                        every setting
    minilora export --model DIR --adapter DIR --out DIR [--prune 0.5 --pattern 2:4] [--nf4 | --bf16]
                                                    merge, optionally prune, write a model directory

Exit status: 0 done, 1 training diverged, 2 bad input, 130 interrupted (checkpoint written).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import MISSING, asdict, fields

from .train.data import DataError, read_utf8
from .train.distributed import teardown
from .experiments import ALL_STRATEGIES, EXPERIMENT_DEFAULTS, DemoSettings, run
from .train.job import JobSettings, run_job
from .train.trainer import Interrupted, NonFiniteLoss, TrainConfig

# flags that only the embedded default has, and those that only a run on your own model has
DEMO_ONLY = {f.name for f in fields(DemoSettings)} - {f.name for f in fields(JobSettings)} - \
    {f.name for f in fields(TrainConfig)}
JOB_ONLY = ({f.name for f in fields(JobSettings)} | {f.name for f in fields(TrainConfig)}) - \
    {f.name for f in fields(DemoSettings)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


DEMO_DEFAULTS = asdict(DemoSettings())  # the synthetic experiment's values


def _add_fields(group, cls, seen: set) -> None:
    """One flag per dataclass field not added yet; its type from the annotation."""
    hints = typing.get_type_hints(cls)
    earlier = {f.metadata["renamed_to"]: f.name for f in fields(cls) if "renamed_to" in f.metadata}
    for f in fields(cls):
        if f.name in seen or "renamed_to" in f.metadata:  # an earlier name: an alias of the new flag below
            continue
        seen.add(f.name)
        aliases = [_flag(earlier[f.name])] if f.name in earlier else []
        default = f.default if f.default is not MISSING else None
        shown = f"default: {default}"
        per_experiment = ", ".join(f"{values[f.name]} ({name})" for name, values in EXPERIMENT_DEFAULTS.items()
                                   if f.name in values)
        if cls is DemoSettings and per_experiment:
            shown = f"default: {per_experiment}"
        elif cls is not DemoSettings and (per_experiment or DEMO_DEFAULTS.get(f.name, default) != default):
            shown += f" (embedded default: {per_experiment or DEMO_DEFAULTS[f.name]})"
        kind = hints[f.name]
        args = typing.get_args(kind)
        if kind is bool:
            group.add_argument(_flag(f.name), *aliases, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=shown)
        elif f.name == "strategies":
            group.add_argument(_flag(f.name), default=argparse.SUPPRESS,
                               help=f"comma-separated, from {', '.join(ALL_STRATEGIES)}")
        else:
            base = next((a for a in args if a is not type(None)), kind)  # Optional[X] -> X
            group.add_argument(_flag(f.name), type=base, default=argparse.SUPPRESS, help=shown)


def _finetune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="fine-tune with LoRA and watch what the model forgets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seen: set = set()
    _add_fields(p.add_argument_group("your model (with --model)"), JobSettings, seen)
    _add_fields(p.add_argument_group("training (with --model; the shared ones apply to the default too)"),
                TrainConfig, seen)
    _add_fields(p.add_argument_group("the embedded default (without --model)"), DemoSettings, seen)
    return p


def _finetune(parser: argparse.ArgumentParser, given: dict) -> int:
    if "model" in given:
        wrong = sorted(DEMO_ONLY & given.keys())
        if wrong:
            parser.error(f"{_flag(wrong[0])} belongs to the embedded default; with --model, the model and "
                         "--steps/--lr decide")
        if "data" not in given:
            parser.error("--model needs --data FILE (.txt or .jsonl): the text to fine-tune on")
        job = JobSettings(**{k: v for k, v in given.items() if k in {f.name for f in fields(JobSettings)}})
        train = TrainConfig(**{k: v for k, v in given.items() if k in {f.name for f in fields(TrainConfig)}})
        try:
            result = run_job(job, train)
        finally:
            teardown()
        if result.stop_reason == "interrupted":
            print(f"interrupted at step {result.steps_done}; checkpoint in {job.out}: add --resume to continue",
                  file=sys.stderr)
            return 130
        if os.environ.get("RANK", "0") == "0":
            print(f"adapter: {job.out}/adapter   metrics: {job.out}/metrics.jsonl   curves: {job.out}/curves.png")
        return 0
    given.pop("resume", None)  # the embedded default always continues a run with the same settings
    wrong = sorted(JOB_ONLY & given.keys())
    if wrong:
        parser.error(f"{_flag(wrong[0])} needs --model DIR: the embedded default builds its own model and data")
    if "strategies" in given:
        given["strategies"] = tuple(s.strip() for s in given["strategies"].split(",") if s.strip())
    run(DemoSettings(**given))  # checks its settings first
    return 0


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="merge an adapter, optionally prune, write a model directory for deployment",
                       description="Merge the adapter into its base (a 4-bit base is dequantized first), optionally "
                       "prune, and write a Hugging Face model directory; --nf4 writes a pre-quantized bitsandbytes "
                       "4-bit checkpoint. The report is printed and saved as <out>/export_report.json.")
    p.add_argument("--model", required=True, help="the base model directory (full precision or bitsandbytes 4-bit)")
    p.add_argument("--adapter", help="the adapter directory (PEFT format); without it the base is exported as is")
    p.add_argument("--out", required=True, help="the model directory to write (refused if it holds a model)")
    p.add_argument("--prune", type=float, help="sparsity in [0, 1): the fraction of linear weights set to zero")
    p.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"], help="default: unstructured")
    p.add_argument("--prune-method", default="magnitude", choices=["magnitude", "wanda"], help="default: magnitude")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="default: layer")
    p.add_argument("--calibration", help="a text file: calibration batches for wanda and the report's losses")
    p.add_argument("--calibration-batches", type=int, default=4, help="batches taken from --calibration (default: 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration row (default: 128)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--nf4", action="store_true", help="write NF4 + double quant (bitsandbytes' 4-bit checkpoint)")
    kind.add_argument("--bf16", action="store_true", help="write bfloat16 weights (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--no-progressbar", "--no-progress", dest="progressbar", action="store_false", help="no progress bars")
    return p


def _calibration(model_dir: str, text_file: str, n_batches: int, seq_len: int) -> list:
    """Up to n_batches rows of seq_len tokens from a text file, tokenized by the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(read_utf8(text_file), return_tensors="pt")["input_ids"][0]
    rows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:n_batches]
    if not rows:
        raise ValueError(f"{text_file} holds {len(ids)} tokens, fewer than one row of --seq-len {seq_len}")
    return [row[None, :] for row in rows]


def _export(given: dict) -> int:
    from .exporting import export

    calibration = (_calibration(given["model"], given["calibration"], given["calibration_batches"], given["seq_len"])
                   if given["calibration"] else None)
    report = export(given["model"], adapter=given["adapter"], out=given["out"], prune=given["prune"],
                    pattern=given["pattern"], prune_method=given["prune_method"], prune_scope=given["scope"],
                    fmt="nf4" if given["nf4"] else "bf16" if given["bf16"] else "fp32", overwrite=given["overwrite"],
                    calibration=calibration, progressbar=given["progressbar"])
    print(f"model: {report.out}   report: {report.out}/export_report.json")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA and QLoRA from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    finetune = _finetune_parser(sub)
    _export_parser(sub)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    given = vars(args)
    command = given.pop("command")
    if command == "export":
        try:
            return _export(given)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"minilora export: error: {e}", file=sys.stderr)
            return 2
    try:
        return _finetune(finetune, given)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"minilora finetune: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"minilora finetune: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"minilora finetune: {e}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
