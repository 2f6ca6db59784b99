"""`minilora …` commands.

    minilora finetune            the embedded default: general-text base, finance fine-tune, forgetting report
    minilora finetune --help     every setting
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .train.demo import DemoSettings, STRATEGIES, run


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune with several strategies and report what each forgets",
                       description=run.__doc__)
    defaults = DemoSettings()
    for f in fields(DemoSettings):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "strategies":
            p.add_argument(flag, default=",".join(value), help=f"comma-separated, from {', '.join(STRATEGIES)}")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default: {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA and QLoRA from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.command == "finetune":
        values = vars(args)
        values.pop("command")
        values["strategies"] = tuple(s.strip() for s in values["strategies"].split(",") if s.strip())
        unknown = [s for s in values["strategies"] if s not in STRATEGIES]
        if unknown:
            parser.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        for key in ("layers", "width", "seq_len", "batch_size", "finetune_steps", "eval_every"):
            if values[key] <= 0:
                parser.error(f"--{key.replace('_', '-')} must be > 0, got {values[key]}")
        if values["width"] % 32:
            parser.error(f"--width must be a multiple of 32 (heads of 32), got {values['width']}")
        run(DemoSettings(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
