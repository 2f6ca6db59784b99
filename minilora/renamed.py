"""Names that changed, kept working for one release: reading one warns and gives the new object.

A module lists its earlier names and forwards the lookup of an unknown attribute here:

    def __getattr__(name):
        return renamed.earlier_name(__name__, name, {"LoRALinear": "LoraLinear"}, globals())
"""

from __future__ import annotations

import warnings


def earlier_name(module: str, name: str, renames: dict[str, str], namespace: dict):
    """The object now called renames[name], with a FutureWarning; AttributeError for any other name."""
    if name not in renames:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = renames[name]
    warnings.warn(f"{module}.{name} is now {module}.{new} (PEFT's spelling); the old name goes in the next release",
                  FutureWarning, stacklevel=3)
    return namespace[new]


def earlier_keyword(function: str, old: str, new: str, old_value, new_value, stacklevel: int = 3):
    """`new_value`, or `old_value` (with a FutureWarning) when the caller still passed `old=`.
    `stacklevel`: 3 points at the caller of a function; 4 at the caller of a dataclass's __init__."""
    if old_value is None:
        return new_value
    warnings.warn(f"{function}({old}=...) is now {function}({new}=...) (PEFT's spelling); the old keyword goes in "
                  "the next release", FutureWarning, stacklevel=stacklevel)
    return old_value
