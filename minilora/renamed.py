"""Names that changed, kept working for one release: reading one warns and gives the new object.

A module lists its earlier names and forwards the lookup of an unknown attribute here:

    def __getattr__(name):
        return renamed.earlier_name(__name__, name, {"LoRALinear": "LoraLinear"}, globals())
"""

from __future__ import annotations

import importlib
import warnings


def earlier_name(module: str, name: str, renames: dict[str, str], namespace: dict, why: str = "PEFT's spelling"):
    """The object now called renames[name] (a name in `namespace`, or "package.module.name" when it
    moved to another module), with a FutureWarning that says `why`; AttributeError for any other name."""
    if name not in renames:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = renames[name]
    home, _, short = new.rpartition(".")
    warnings.warn(f"{module}.{name} is now {new if home else f'{module}.{new}'} ({why}); the old name goes in the "
                  "next release", FutureWarning, stacklevel=3)
    return getattr(importlib.import_module(home), short) if home else namespace[new]


def earlier_keyword(function: str, old: str, new: str, old_value, new_value, stacklevel: int = 3):
    """`new_value`, or `old_value` (with a FutureWarning) when the caller still passed `old=`.
    `stacklevel`: 3 points at the caller of a function; 4 at the caller of a dataclass's __init__."""
    if old_value is None:
        return new_value
    warnings.warn(f"{function}({old}=...) is now {function}({new}=...) (PEFT's spelling); the old keyword goes in "
                  "the next release", FutureWarning, stacklevel=stacklevel)
    return old_value


def earlier_keywords(function: str, given: dict, renames: dict[str, str], stacklevel: int = 3) -> dict:
    """{name now: value} for the earlier keywords in `given` ({earlier name: value}), each with a
    FutureWarning; a TypeError for a keyword that is neither, as Python gives for an unknown one."""
    unknown = sorted(given.keys() - renames.keys())
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    for old in given:
        warnings.warn(f"{function}({old}=...) is now {function}({renames[old]}=...); the old keyword goes in the next "
                      "release", FutureWarning, stacklevel=stacklevel)
    return {renames[old]: value for old, value in given.items()}
