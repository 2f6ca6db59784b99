"""Loss curves as a PNG: validation loss (what is learned) beside retain loss (what is forgotten)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..files import atomic_write


def plot_curves(curves: dict[str, list[dict]], path: Path, log: Callable[[str], None] = print,
                retain_title: str = "retain loss (don't forget)", loss_unit: str = "nats/token") -> Optional[Path]:
    """One line per run in each panel; records need "step", "val_loss" and optionally "retain_loss".
    Needs matplotlib; without it, says so and writes nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no {path.name} (pip install matplotlib)")
        return None
    fig, (ax_val, ax_retain) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for name, curve in curves.items():
        steps = [c["step"] for c in curve]
        ax_val.plot(steps, [c["val_loss"] for c in curve], label=name)
        if all(c.get("retain_loss") is not None for c in curve):
            ax_retain.plot(steps, [c["retain_loss"] for c in curve], label=name)
    ax_val.set(title="domain validation loss (learn)", xlabel="step", ylabel=f"loss ({loss_unit})")
    ax_retain.set(title=retain_title, xlabel="step")
    ax_val.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path
