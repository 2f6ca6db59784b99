"""Writes the families table of docs/fused-layers.md from minilora's role tables, so it cannot go
stale: one row per family, the model types it covers, its modules per role, each fused layer's
layout and PEFT's default targets.

    python docs/roles_table.py                  print the table
    python docs/roles_table.py --update [FILE]  rewrite the table between the markers <!-- roles-table -->
                                                and <!-- /roles-table --> (default: docs/fused-layers.md)
    python docs/roles_table.py --check [FILE]   exit 1 if the table there is not this one
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minilora.families import DEFAULT_TARGETS, FAMILIES, MODEL_TYPES
from minilora.files import atomic_write

ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
LAYOUT_WORDS = {  # how each fused layout places its parts, in the table's words ("\\|": a bar inside a cell)
    "contiguous": "[q \\| k \\| v], GQA sizes",
    "per_head": "[q_h k_h v_h] per head",
    "falcon": "per kv group [q×H/g k v] (new arch.), [q \\| k \\| v] multi-query, per head otherwise",
    "bigcode": "[q \\| k (dh) \\| v (dh)] multi-query, per head otherwise",
    "linear_qkv": "[q \\| k \\| v], linear attention",
    "halves": "[gate \\| up]",
    "interleaved": "[g_0 u_0 g_1 u_1 …]",
}
BEGIN, END = "<!-- roles-table -->", "<!-- /roles-table -->"
PAGE = Path(__file__).resolve().parent / "fused-layers.md"  # the page that shows the table


def module_name(pattern: str) -> str:
    """A table regex as a reader writes the module path: `(?:self|encoder)_attn\\.q_proj` -> self/encoder_attn.q_proj."""
    name = pattern.replace("\\.", ".").replace("(?:Self|EncDec)", "Self/EncDec").replace("(?:self|encoder)", "self/encoder")
    return name.replace("\\d+", "N")


def rows() -> list[list[str]]:
    """One row per family: family, model types, the module of each role, fused layouts."""
    table = []
    for family, rules in FAMILIES.items():
        types = sorted(t for t, f in MODEL_TYPES.items() if f == family)
        cells = {role: [] for role in ROLE_ORDER}
        layouts = []
        for pattern, role, layout in rules:
            name = f"`{module_name(pattern)}`"
            for part in role.split("_"):
                if name not in cells[part]:
                    cells[part].append(name)
            if layout:
                layouts.append(f"`{module_name(pattern)}`: {LAYOUT_WORDS[layout]}")
        table.append([family, ", ".join(types), *(" ".join(cells[r]) or "—" for r in ROLE_ORDER),
                      "; ".join(layouts) or "—", defaults(types)])
    return table


def defaults(types: list[str]) -> str:
    """PEFT's default targets for these model types, and the types PEFT has none for."""
    chosen = sorted({", ".join(DEFAULT_TARGETS[t]) for t in types if t in DEFAULT_TARGETS})
    missing = [t for t in types if t not in DEFAULT_TARGETS]
    text = " / ".join(f"`{d}`" for d in chosen)
    if missing:
        text += ("; " if text else "") + f"none for {', '.join(missing)}"
    return text


def updated(text: str) -> str:
    """`text` (a page) with the table between BEGIN and END replaced by the current one."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the file has no {BEGIN} ... {END} markers; put them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown()}{END}{tail}"


def markdown() -> str:
    header = ["family", "model types", *ROLE_ORDER, "fused layouts", "default targets (PEFT's)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, nargs="?", const=PAGE,
                        help=f"rewrite the table between the markers in this file (default: {PAGE.name})")
    parser.add_argument("--check", type=Path, nargs="?", const=PAGE,
                        help=f"exit 1 if the table between the markers in this file is stale (default: {PAGE.name})")
    args = parser.parse_args(argv)
    if args.update is not None:
        text = updated(args.update.read_text())
        atomic_write(args.update, lambda p: Path(p).write_text(text))
    elif args.check is not None:
        text = args.check.read_text()
        if updated(text) != text:
            print(f"{args.check}: the families table is stale; run python docs/roles_table.py --update {args.check}")
            return 1
    else:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
