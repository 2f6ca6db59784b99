"""`minilora …` commands.

    minilora finetune                               the embedded default: general-text base, finance
                                                    fine-tune with four strategies, forgetting report
    minilora finetune --experiment minilm           the same comparison on the pretrained MiniLM and
                                                    standard-library docstrings
    minilora finetune --model DIR --data FILE …     fine-tune a local Hugging Face model with LoRA
    minilora finetune --help                        every setting
    minilora export --model DIR --adapter DIR --out DIR [--sparsity 0.5 --pattern 2:4] [--format nf4]
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
from .train.tasks import TASKS
from .train.trainer import Interrupted, NonFiniteLoss, TrainConfig

# the settings classes whose fields are the flags of `minilora finetune`, in --help's order; a flag that
# several classes share (--seed, --batch-size) sets each of them
TASK_SETTINGS = {name: task.settings_class for name, task in TASKS.items() if task.settings_class is not None}
SETTINGS_CLASSES = (JobSettings, TrainConfig, *TASK_SETTINGS.values(), DemoSettings)


def _flag_fields(cls) -> list:
    """The fields of a settings class that are flags: not an earlier name (an alias of its new flag), not
    a place that other flags fill (TrainConfig.task_settings)."""
    return [f for f in fields(cls) if not ({"renamed_to", "moved_to"} & f.metadata.keys()) and f.name != "task_settings"]


READERS: dict[str, set] = {}  # flag name -> the settings classes that read it
for _cls in SETTINGS_CLASSES:
    for _field in _flag_fields(_cls):
        READERS.setdefault(_field.name, set()).add(_cls)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


DEMO_DEFAULTS = asdict(DemoSettings())  # the synthetic experiment's values


def _add_fields(group, cls, seen: set) -> None:
    """One flag per flag field of the settings class `cls` not added yet; its type from the annotation."""
    hints = typing.get_type_hints(cls)
    earlier = {f.metadata["renamed_to"]: f.name for f in fields(cls) if "renamed_to" in f.metadata}
    for f in _flag_fields(cls):
        if f.name in seen:
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
    for task, settings_class in TASK_SETTINGS.items():
        _add_fields(p.add_argument_group(f"--task {task} only (with --model)"), settings_class, seen)
    _add_fields(p.add_argument_group("the embedded default (without --model)"), DemoSettings, seen)
    return p


def _read_by(cls, given: dict) -> dict:
    """The given flags that the settings class `cls` reads."""
    return {k: v for k, v in given.items() if cls in READERS.get(k, ())}


def _finetune(parser: argparse.ArgumentParser, given: dict) -> int:
    if "model" in given:
        wrong = sorted(k for k in given if READERS[k] == {DemoSettings})
        if wrong:
            parser.error(f"{_flag(wrong[0])} belongs to the embedded default; with --model, the model and "
                         "--steps/--lr decide")
        if "data" not in given and "adapters" not in given:
            parser.error("--model needs --data FILE (.txt or .jsonl): the text to fine-tune on (or --adapters "
                         "NAME=FILE,NAME=FILE: one adapter per file, trained together)")
        task = given.get("task", TrainConfig.task)
        for name, settings_class in TASK_SETTINGS.items():
            flags = _read_by(settings_class, given)
            if flags and name != task:
                parser.error(f"{_flag(sorted(flags)[0])} belongs to --task {name}; this run's task is {task}")
        task_settings = _read_by(TASK_SETTINGS[task], given) if task in TASK_SETTINGS else None
        job = JobSettings(**_read_by(JobSettings, given))
        train = TrainConfig(**_read_by(TrainConfig, given), task_settings=task_settings)
        try:
            result = run_job(job, train)
        finally:
            teardown()
        if result.stop_reason == "interrupted":
            print(f"interrupted at step {result.steps_done}; checkpoint in {job.out}: add --resume to continue",
                  file=sys.stderr)
            return 130
        if os.environ.get("RANK", "0") == "0" and job.adapters is not None:
            print(f"adapters: {job.out}/adapters/<name>   router: {job.out}/adapters/routing.json   "
                  f"metrics: {job.out}/metrics.jsonl")
        elif os.environ.get("RANK", "0") == "0":
            print(f"adapter: {job.out}/adapter   metrics: {job.out}/metrics.jsonl   curves: {job.out}/curves.png")
        return 0
    given.pop("resume", None)  # the embedded default always continues a run with the same settings
    wrong = sorted(k for k in given if DemoSettings not in READERS[k])
    if wrong:
        parser.error(f"{_flag(wrong[0])} needs --model DIR: the embedded default builds its own model and data")
    if "strategies" in given:
        given["strategies"] = tuple(s.strip() for s in given["strategies"].split(",") if s.strip())
    run(DemoSettings(**given))  # checks its settings first
    return 0


class EarlierFlag(argparse.Action):
    """An earlier flag of `minilora export`, kept for one release: it sets its new flag's value (its
    own value, or `const` for a switch such as --nf4) and says the new spelling on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.const is not None else float(values) if self.dest == "sparsity" else values
        new = f"--{self.dest} {value}"
        print(f"minilora export: {option_string} is now {new}; the old flag goes in the next release",
              file=sys.stderr)
        setattr(namespace, self.dest, value)


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="merge an adapter, optionally prune, write a model directory for deployment",
                       description="Merge the adapter into its base (a 4-bit base is dequantized first), optionally "
                       "prune, and write a Hugging Face model directory; --format nf4 writes a pre-quantized bitsandbytes "
                       "4-bit checkpoint. The report is printed and saved as <out>/export_report.json.")
    p.add_argument("--model", required=True, help="the base model directory (full precision or bitsandbytes 4-bit)")
    p.add_argument("--adapter", help="the adapter directory (PEFT format); without it the base is exported as is")
    p.add_argument("--out", required=True, help="the model directory to write (refused if it holds a model)")
    p.add_argument("--sparsity", type=float, help="prune: the fraction of linear weights set to zero, in [0, 1) "
                   "(default: no pruning)")
    p.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"], help="default: unstructured")
    p.add_argument("--method", default="magnitude", choices=["magnitude", "wanda"], help="how weights are scored "
                   "for pruning (default: magnitude)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="default: layer")
    p.add_argument("--calibration", help="a text file: calibration batches for wanda and the report's losses")
    p.add_argument("--calibration-batches", type=int, default=4, help="batches taken from --calibration (default: 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration row (default: 128)")
    p.add_argument("--format", default="fp32", choices=["fp32", "bf16", "nf4"], help="the written weights: fp32, "
                   "bf16, or nf4 (NF4 + double quant, bitsandbytes' 4-bit checkpoint); default: fp32")
    for flag, dest, value in (("--prune", "sparsity", None), ("--prune-method", "method", None),
                              ("--nf4", "format", "nf4"), ("--bf16", "format", "bf16")):  # the earlier flags
        p.add_argument(flag, dest=dest, action=EarlierFlag, nargs=0 if value else None, const=value,
                       help=argparse.SUPPRESS)
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
    report = export(given["model"], adapter=given["adapter"], out=given["out"], sparsity=given["sparsity"],
                    pattern=given["pattern"], method=given["method"], scope=given["scope"], format=given["format"],
                    overwrite=given["overwrite"], calibration=calibration, progressbar=given["progressbar"])
    print(f"model: {report.out}   report: {report.out}/export_report.json")
    return 0


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser and its `finetune` subparser."""
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA and QLoRA from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    finetune = _finetune_parser(sub)
    _export_parser(sub)
    return parser, finetune


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `minilora` command line (`finetune` and `export`), the one `main` reads its
    arguments with; parsing checks the flags and their types, not what `main` checks after it (which
    flags go together, the files)."""
    return _parsers()[0]


def main(argv=None) -> int:
    parser, finetune = _parsers()
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
