"""The checks every settings class shares: a number in its range and finite, a whole number at least
its lowest. Each refusal names the setting, its flag, the value and what is accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _rule(low: float, high: float, closed: tuple[bool, bool]) -> str:
    """'> 0', '>= 0' or 'in [0, 0.5)': the accepted values, as the messages show them."""
    if high == math.inf:
        return f"{'>=' if closed[0] else '>'} {low:g}"
    return f"in {'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"


def check_number(name: str, value, low: float, high: float, closed: tuple[bool, bool], meaning: str) -> None:
    """A finite number in the range; else a ValueError naming the setting, its flag, the value and the range."""
    rule = _rule(low, high, closed)
    fits = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and (low <= value if closed[0] else low < value) and (value <= high if closed[1] else value < high))
    if not fits:
        raise ValueError(f"{name} must be {rule} ({meaning}), got {value!r}; give {_flag(name)} a finite number "
                         f"{rule}")


def check_count(name: str, value, lowest: int, meaning: str, highest: Optional[int] = None) -> None:
    """A whole number in [lowest, highest]; else a ValueError naming the setting, its flag, the value and
    the range."""
    rule = ("> 0" if lowest == 1 else f">= {lowest}") if highest is None else f"in [{lowest}, {highest}]"
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < lowest or (highest is not None and value > highest):
        raise ValueError(f"{name} must be {rule} ({meaning}), got {value!r}; give {_flag(name)} a whole number "
                         f"{rule}")


def check_numbers(settings, ranges: dict) -> None:
    """`check_number` for each entry of `ranges` ({name: (low, high, closed, meaning)}); a setting left
    at None is switched off and not checked."""
    for name, (low, high, closed, meaning) in ranges.items():
        if getattr(settings, name) is not None:
            check_number(name, getattr(settings, name), low, high, closed, meaning)
