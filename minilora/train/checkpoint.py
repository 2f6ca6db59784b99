"""Training checkpoints and the run directory.

    <out>/run.json          what this run is (settings and data); a different run is refused. It marks
                            the directory as a minilora run: a directory without it that holds
                            anything is never written into, and --overwrite deletes only a run's files
    <out>/checkpoint.pt     everything needed to continue bit-exactly: trainable weights, the best
                            ones so far, optimizer and schedule state, RNG states, data positions,
                            the monitor and the metric history. One file, replaced atomically.
    <out>/checkpoint.shards/  under --parallel fsdp: the sharded part (trainable weights, best ones,
                            optimizer state), written by every process through
                            torch.distributed.checkpoint, plus each process's RNG state; then
                            checkpoint.pt holds the rest. Both carry the step, and must agree.
    <out>/metrics.jsonl     one JSON object per line: "train" records and "eval" records
    <out>/curves.png        validation and retain loss against steps
    <out>/adapter/          the kept (best) adapter in PEFT's format (model.safetensors for a model
                            trained without adapters)
    <out>/result.json       how the run ended
    <out>/labels.json       classification: the name of each class index

The checkpoint is read with `torch.load(weights_only=True)`: tensors and plain values only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..files import atomic_write, read_json_object
from ..state_names import current_name

SHARDS = "checkpoint.shards"  # the directory of a sharded checkpoint's shards
SHARDED = ("trainable", "best", "optimizer")  # the parts of the trainer's state that are sharded
RUN_FILES = ("run.json", "checkpoint.pt", SHARDS, "metrics.jsonl", "curves.png", "result.json", "adapter", "labels.json")


class RunDirectoryError(ValueError):
    """The output directory holds something this run must not overwrite (or nothing to resume)."""


def check_directory(out: Path, run: dict, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written or deleted, an output directory this run must not use: one
    that holds something other than a minilora run, a run with work to lose (without --resume or
    --overwrite), a different run to resume, or nothing to resume."""
    if resume and overwrite:
        raise RunDirectoryError("--resume continues the run in the output directory, --overwrite deletes it: "
                                "pass one of them")
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a directory; pick another --out")
    record = out / "run.json"
    if out.is_dir() and not record.is_file():
        others = sorted(p.name for p in out.iterdir())
        if others:  # not a minilora run: nothing in it is ours to replace, let alone delete
            raise RunDirectoryError(
                f"--out {out} already exists and holds no minilora run (no run.json) but {len(others)} other "
                f"entr{'y' if len(others) == 1 else 'ies'} (e.g. {others[0]}); minilora only writes into, or with "
                "--overwrite deletes, a directory it made itself: pick another --out, or empty this one")
    if overwrite:
        return  # the run in `out` is deleted by `prepare`, once this run has passed its own checks
    if record.is_file() and (resume or (out / "checkpoint.pt").is_file()):  # a run with work to lose
        if not resume:
            raise RunDirectoryError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                                    "start again, or choose another output directory")
        changed = differences(_read_record(record), run)
        if changed:
            raise RunDirectoryError(f"{out} holds a different run (settings differ in: {', '.join(changed)}); "
                                    "resume with the same settings, or pass --overwrite to start again")
    elif resume:
        raise RunDirectoryError(f"nothing to resume in {out}: it has no run.json; start without --resume")
    if resume and not (out / "checkpoint.pt").is_file():
        raise RunDirectoryError(f"nothing to resume in {out}: no checkpoint.pt was written yet; start again "
                                "with --overwrite")


def prepare(out: Path, run: dict, resume: bool, overwrite: bool) -> None:
    """Check `out` against this run (`check_directory`), then, with `overwrite`, delete the run it
    holds (only the files a run writes), and record this run. Call it once the new run has passed
    every check of its own, right before training: a run refused later would have cost the old one."""
    check_directory(out, run, resume, overwrite)
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    record = out / "run.json"
    atomic_write(record, lambda p: Path(p).write_text(json.dumps(run, indent=2, sort_keys=True, default=str)))


def _read_record(record: Path) -> dict:
    """The settings a run directory's run.json holds."""
    return read_json_object(record, "a minilora run record", "start again with --overwrite, or choose another "
                            "output directory", RunDirectoryError)


# Settings that earlier releases recorded for every run and now only the runs that read them do,
# with the value they held where nothing read them: a record holding that value resumes as before.
RETIRED = {"loss": "dpo", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5, "precompute_ref": False}


def differences(held: dict, run: dict) -> list[str]:
    """The settings in which a recorded run and this one differ."""
    held = {k: v for k, v in held.items() if not (k in RETIRED and k not in run and v == RETIRED[k])}
    return sorted(k for k in held.keys() | run.keys() if held.get(k) != run.get(k))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a checkpoint from elsewhere, or a damaged file
        raise RunDirectoryError(f"{path} cannot be read as a minilora checkpoint ({e}); start again with "
                                "--overwrite") from None


def check_world(saved: dict, world: int, path: Path) -> None:
    """A run continues on as many processes as it was written by: each one's share of every global
    batch, and under --parallel fsdp its shards, depend on the count."""
    written = saved.get("world", world)
    if written != world:
        raise RunDirectoryError(f"{path} was written by {written} processes and this run has {world}: the global "
                                f"batch and the shards depend on the count. Resume with {written} processes "
                                f"(torchrun --nproc_per_node={written}, or nodes × processes = {written}), or start "
                                "again with --overwrite")


def save_sharded(out: Path, state: dict, rank: int, is_main: bool) -> None:
    """Every process writes its shards of `state`'s SHARDED parts into <out>/checkpoint.shards (through
    torch.distributed.checkpoint) and its RNG state; then the main process writes the rest to
    checkpoint.pt. The new shards are staged in a directory of their own and swapped in whole."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    state = dict(state)
    tensors = {k: state.pop(k) for k in SHARDED}
    tensors["step"] = torch.tensor(state["step"])  # the two halves must be of the same step
    state["best_names"] = sorted(tensors["best"])
    staging, previous = out / (SHARDS + ".new"), out / (SHARDS + ".old")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    dcp.save(tensors, checkpoint_id=staging)
    atomic_write(staging / f"rng.rank{rank}.pt", lambda p: torch.save(rng_state(), p))
    dist.barrier()
    if is_main:
        shutil.rmtree(previous, ignore_errors=True)
        if (out / SHARDS).is_dir():
            os.replace(out / SHARDS, previous)
        os.replace(staging, out / SHARDS)
        shutil.rmtree(previous, ignore_errors=True)
        save(out / "checkpoint.pt", state)
    dist.barrier()


def load_sharded(out: Path, state: dict, current: dict, world: int, rank: int) -> dict:
    """`state` (read from checkpoint.pt) completed with the shards of this process, read into the
    sharded tensors of `current` (the trainer's state_dict, its optimizer state initialized)."""
    import torch.distributed.checkpoint as dcp

    path = out / "checkpoint.pt"
    check_world(state, world, path)
    if not (out / SHARDS).is_dir():
        raise RunDirectoryError(f"{path} has no {SHARDS} directory beside it: it was not written under --parallel "
                                "fsdp; resume with the settings it was written with, or start again with --overwrite")
    trainable = current["trainable"]
    saved = {n: current_name(n) for n in state["best_names"]}  # the shards' names -> today's
    if set(saved.values()) - trainable.keys():
        check_names(dict.fromkeys(saved.values()), trainable, path)
    targets = {"trainable": {n: trainable[now] for n, now in saved.items()},
               "best": {n: trainable[now].clone() for n, now in saved.items()},
               "optimizer": current["optimizer"], "step": torch.tensor(-1)}
    dcp.load(targets, checkpoint_id=out / SHARDS)
    if int(targets["step"]) != state["step"]:
        raise RunDirectoryError(f"{out / SHARDS} holds step {int(targets['step'])} but {path} step {state['step']}: "
                                "saving was cut short; start again with --overwrite")
    state = {**state, **{k: targets[k] for k in SHARDED}}
    state["rng"] = torch.load(out / SHARDS / f"rng.rank{rank}.pt", weights_only=True)
    return state


def with_current_names(state: dict) -> dict:
    """The trainer state with its parameters under today's names (state_names.current_name): a
    checkpoint written before parameters took PEFT's names resumes as it was."""
    renamed = {k: {current_name(n): t for n, t in state[k].items()} for k in ("trainable", "best")
               if isinstance(state.get(k), dict)}
    return {**state, **renamed}


def check_names(saved: dict, params: dict, path: Path) -> None:
    """The checkpoint must hold exactly the trainable parameters of this model."""
    missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or extra:
        example = (missing or extra)[0]
        raise RunDirectoryError(f"{path} was written for different trainable parameters ({len(missing)} missing, "
                                f"{len(extra)} unexpected, e.g. {example}); resume with the same model and "
                                "adapter config")


def append_metrics(path: Optional[Path], record: dict) -> None:
    if path is None:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the records past the checkpoint a resumed run continues from."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _step(line) <= last_step]
    atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in kept)))


def _step(line: str) -> float:
    """The step of a metrics record; a line cut short by a crash counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
