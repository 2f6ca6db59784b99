"""What every benchmark here shares: interleaved timing with medians, and writing the results."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).parent / "results"


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable over `repeats` rounds, in a new shuffled order every round,
    after `warmup` rounds that are not counted (allocations, caches, one-time builds)."""
    times = {name: [] for name in runs}
    order = list(runs)
    for i in range(warmup + repeats):
        random.Random(i).shuffle(order)
        for name in order:
            start = time.perf_counter()
            runs[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_step(model, ids: torch.Tensor, autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One forward + backward of a causal LM on `ids`, gradients cleared after."""
    def run():
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_results(out: Path, table: list[str], data: dict) -> None:
    """Print the markdown table; write it to <out>.md and `data` to <out>.json."""
    print("\n".join(table))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
