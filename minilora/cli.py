"""`minilora …` commands.

    minilora finetune                               the embedded default: general-text base, finance
                                                    fine-tune with four strategies, forgetting report
    minilora finetune --model DIR --data FILE …     fine-tune a local Hugging Face model with LoRA
    minilora finetune --help                        every setting

Exit status: 0 done, 1 training diverged, 2 bad input, 130 interrupted (checkpoint written).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import MISSING, fields

from .train.data import DataError
from .train.distributed import teardown
from .train.demo import ALL_STRATEGIES, DemoSettings, run
from .train.job import JobSettings, run_job
from .train.trainer import Interrupted, NonFiniteLoss, TrainConfig

# flags that only the embedded default has, and those that only a run on your own model has
DEMO_ONLY = {f.name for f in fields(DemoSettings)} - {f.name for f in fields(JobSettings)} - \
    {f.name for f in fields(TrainConfig)}
JOB_ONLY = ({f.name for f in fields(JobSettings)} | {f.name for f in fields(TrainConfig)}) - \
    {f.name for f in fields(DemoSettings)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


DEMO_DEFAULTS = {f.name: f.default for f in fields(DemoSettings)}


def _add_fields(group, cls, seen: set) -> None:
    """One flag per dataclass field not added yet; its type from the annotation."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        default = f.default if f.default is not MISSING else None
        shown = f"default: {default}"
        if cls is not DemoSettings and DEMO_DEFAULTS.get(f.name, default) != default:
            shown += f" (embedded default: {DEMO_DEFAULTS[f.name]})"
        kind = hints[f.name]
        args = typing.get_args(kind)
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA and QLoRA from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    finetune = _finetune_parser(sub)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    given = vars(args)
    given.pop("command")
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
