"""The trainer: adapters (or any trainable parameters) on a frozen base, watched for forgetting.

One optimizer step, with G = batch_size × grad_accum × processes examples in the global batch:

    N      = Σ over the global batch of scored tokens (labels ≠ −100)     one all-reduce of a count
    loss   = Σ_micro-batches Σ_tokens ℓ_t / N                             backward per micro-batch
    g      = Σ_processes ∇loss                                            one all-reduce, adapters only
    clip g to max_grad_norm; skip the step if the loss or ‖g‖ is not finite
    AdamW (or PagedAdamW) step, LoRA+ learning rates if asked; warmup + cosine schedule step

Dividing by the global token count (not by each micro-batch's own) makes gradient accumulation and
data parallelism give the gradient of the whole batch, whatever the padding.

Every `eval_every` steps (and at step 0 and the last): validation loss and retain loss (for a
sentence encoder, the embedding drift of a `RetentionProbe`: retention.py), then the `Monitor`
decides best / stop. A fraction `replay_ratio` of each batch comes from a replay set
(general text the model should keep). At the end the best adapter is restored.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .. import kbit
from ..files import atomic_write
from ..model import LoraModel
from ..optim import PagedAdamW, create_loraplus_optimizer
from . import checkpoint, fsdp
from .batches import Sampler, replay_count
from .chunked_loss import unavailable
from .data import Examples
from .distributed import Processes, all_reduce_gradients, all_reduce_sum, setup
from .monitor import Monitor
from .retention import RetentionProbe
from .plots import plot_curves
from .schedule import warmup_cosine
from .tasks import task_named
from .train_config import TrainConfig, check_batch

@dataclass
class TrainResult:
    steps_done: int  # optimizer steps taken (skipped non-finite steps included)
    stop_reason: str  # "completed", or why the monitor or the user stopped it
    best_step: int  # the step whose adapter was kept
    val_loss_before: float
    val_loss_after: float  # of the kept adapter
    retain_loss_before: Optional[float]
    retain_loss_after: Optional[float]  # of the kept adapter
    seconds: float
    history: list[dict] = field(default_factory=list)  # the "eval" records

    def to_dict(self) -> dict:
        return asdict(self)


class NonFiniteLoss(RuntimeError):
    """Training stopped after repeated non-finite losses or gradients."""


class Interrupted(Exception):
    """Ctrl-C stopped a run after writing its checkpoint; the message says how to continue."""


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing through the transformers model's own switch (kbit.py), non-reentrant: each
    layer keeps its input only and recomputes the rest in the backward pass. Refused for a model without it."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(hf).__name__} has no gradient_checkpointing_enable; "
                         "train without --gradient-checkpointing")
    kbit.enable_checkpointing(model, {"use_reentrant": False})  # a LoraModel's keeps per-call adapters too


class Trainer:
    """Trains the parameters of `model` that require grad. See the module docstring."""

    def __init__(self, model: nn.Module, config: TrainConfig, train: Examples, val: Examples,
                 retain: Union[Examples, RetentionProbe, None] = None, replay: Optional[Examples] = None,
                 out: Optional[Path] = None, log: Callable[[str], None] = print,
                 processes: Optional[Processes] = None):
        config.check()
        if config.replay_ratio > 0 and replay is None:
            raise ValueError("replay_ratio > 0 needs a replay set (--replay FILE, or --retain to replay from it)")
        if replay is not None and config.replay_ratio > 0 and replay.tensors.keys() != train.tensors.keys():
            raise ValueError(f"replay rows ({', '.join(replay.tensors)}) do not fit {config.task} rows "
                             f"({', '.join(train.tensors)}); replay works for domain and instruction tuning")
        self.model, self.config, self.log = model, config, log
        self.train_set, self.val_set, self.retain_set, self.replay_set = train, val, retain, replay
        self.out = Path(out) if out is not None else None
        self.procs = processes or setup()
        if len(train) < 1:
            raise ValueError("the training set is empty")
        check_batch(config, len(train), self.procs.world)
        model.to(self.procs.device)
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        self.sharded = config.parallel == "fsdp"
        if self.sharded:
            fsdp.shard_model(model, self.procs)
        self.objective = task_named(config.task).objective(model, config, self.procs)  # may add the policy adapter
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters: add an adapter (get_peft_model) or unfreeze "
                             "some parameters")
        self.params = [p for _, p in self.named]
        self.task = task_named(train.task)  # the training rows' loss (task.py); evaluation asks each set's own
        reason = unavailable(model) if config.chunked_loss else "switched off (chunked_loss=False)"
        self.chunked = reason is None  # a causal LM's loss without all its logits (chunked_loss.py)
        if reason is not None and config.chunked_loss and self.task.causal_lm:
            log(f"the plain loss, with every logit at once: {reason}")
        if self.objective is not None:
            train = self.train_set = self.objective.prepare(train)
        self.global_batch = config.batch_size * config.grad_accum * self.procs.world
        self.samplers = {"train": Sampler(len(train), config.seed)}
        if replay is not None and config.replay_ratio > 0:
            self.samplers["replay"] = Sampler(len(replay), config.seed + 1)
        optimizer_cls = PagedAdamW if config.optimizer == "paged_adamw" else torch.optim.AdamW
        if config.loraplus_lr_ratio is not None:
            self.optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=config.lr,
                                                       loraplus_lr_ratio=config.loraplus_lr_ratio,
                                                       loraplus_weight_decay=config.weight_decay)
        else:
            self.optimizer = optimizer_cls(self.params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = config.warmup_steps if config.warmup_steps >= 0 else max(1, config.steps // 10)
        self.schedule = warmup_cosine(self.optimizer, warmup, config.steps, config.min_lr_ratio)
        self.monitor = Monitor(config.patience, config.min_delta, config.forgetting_budget,
                               unit=getattr(retain, "unit", "nats"))  # a retention probe measures 1 − cos
        self.history: list[dict] = []  # the "eval" records
        self.since_eval: list[float] = []  # training losses since the last evaluation
        self.best: dict[str, torch.Tensor] = {}
        self.step, self.bad_steps, self.last_saved = 0, 0, None
        self._interrupted = False
        self.seconds_before, self._clock = 0.0, time.perf_counter()  # time spent by earlier sessions of this run

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        device = self.procs.device.type
        bf16 = self.config.precision == "bf16" or (
            self.config.precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
        return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def _global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The G rows of this step: training examples, then the replayed ones."""
        n_replay = replay_count(step, self.global_batch, self.config.replay_ratio) if "replay" in self.samplers else 0
        rows = self.train_set.rows(self.samplers["train"].take(self.global_batch - n_replay))
        if n_replay:
            extra = self.replay_set.rows(self.samplers["replay"].take(n_replay))
            rows = {k: torch.cat([rows[k], extra[k]]) for k in rows}
        return rows

    def _micro_batches(self, rows: dict[str, torch.Tensor]):
        """This process's micro-batches: micro-batch j of rank r is slice (j·world + r) of the global batch."""
        b, world, rank = self.config.batch_size, self.procs.world, self.procs.rank
        for j in range(self.config.grad_accum):
            start = (j * world + rank) * b
            yield {k: v[start:start + b].to(self.procs.device) for k, v in rows.items()}

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step (or a skipped one); (loss, gradient norm)."""
        task = self.task
        micro = list(self._micro_batches(self._global_batch(self.step + 1)))
        n_tokens = all_reduce_sum(sum(task.count(m) for m in micro).to(self.procs.device),
                                  self.procs)
        total = torch.zeros((), device=self.procs.device)
        for m in micro:
            with self._autocast():
                loss = (self.objective.summed(m) if self.objective else
                        task.summed_loss(self.model, m, self.chunked)) / n_tokens
            loss.backward()
            total += loss.detach()
        loss = all_reduce_sum(total, self.procs).item()
        if self.sharded:  # FSDP summed the gradient shards already; the norm is over every shard
            norm = fsdp.clip_grad_norm(self.params, self.config.max_grad_norm)
        elif self.config.max_grad_norm > 0:
            all_reduce_gradients(self.params, self.procs)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm).item()
        else:
            all_reduce_gradients(self.params, self.procs)
            norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])).item()
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.log(f"step {self.step + 1}: loss {loss}, gradient norm {norm}: not finite, step skipped")
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm

    @torch.no_grad()
    def evaluate(self, examples: Examples) -> float:
        """Mean loss per scored token over `examples`, each process taking every world-th row."""
        was_training = self.model.training
        self.model.eval()
        rows = torch.arange(self.procs.rank, len(examples), self.procs.world)
        sums = torch.zeros(2, dtype=torch.float64, device=self.procs.device)  # [Σ loss, Σ tokens]
        task = task_named(examples.task)  # preference: its retain set is text
        for i in range(0, len(rows), self.config.eval_batch_size):
            batch = {k: v.to(self.procs.device) for k, v in examples.rows(rows[i:i + self.config.eval_batch_size]).items()}
            with self._autocast():
                sums[0] += task.summed_loss(self.model, batch, self.chunked).double()
            sums[1] += task.count(batch)
        if self.sharded:  # every process runs as many forward passes (each all-gathers the layers)
            spare = {k: v.to(self.procs.device) for k, v in examples.rows(torch.arange(1)).items()}
            busiest = -(-len(examples) // self.procs.world)  # rank 0's rows
            for _ in range(-(-busiest // self.config.eval_batch_size) - -(-len(rows) // self.config.eval_batch_size)):
                task.summed_loss(self.model, spare, self.chunked)
        self.model.train(was_training)
        total = all_reduce_sum(sums, self.procs)
        return (total[0] / total[1]).item()

    def _retain_scores(self) -> dict:
        """{"retain_loss": …}: the loss on retain text, or a retention probe's drift with its other
        measures (an encoder's embeddings, retention.py); None without a retain set."""
        if self.retain_set is None:
            return {"retain_loss": None}
        if isinstance(self.retain_set, Examples):
            return {"retain_loss": self.evaluate(self.retain_set)}
        return self.retain_set.measure(self.model)

    @property
    def preference(self):
        """The preference task's objective (PreferenceObjective), under the name it had first."""
        return self.objective

    def _eval(self, train_loss: Optional[float]) -> dict:
        scores = (self.objective.evaluate(self.val_set, self._autocast) if self.objective is not None
                  else {"val_loss": self.evaluate(self.val_set)})  # preference: its metrics too (preference.py)
        val = scores["val_loss"]
        retain_scores = self._retain_scores()
        retain = retain_scores.pop("retain_loss")
        is_best = self.monitor.observe(self.step, val, retain)
        if is_best or (not self.best and self.step == self.monitor.best_step):  # the kept adapter is always the
            self.best = {n: fsdp.snapshot(p) for n, p in self.named}  # step the result names (step 0 by default)
        forgetting = self.monitor.forgetting(retain)
        record = {"kind": "eval", "step": self.step, "train_loss": train_loss, "lr": self.schedule.get_last_lr()[0],
                  "val_loss": val, "retain_loss": retain,
                  "retain_ppl": math.exp(min(retain, 50.0)) if isinstance(self.retain_set, Examples) else None,
                  "forgetting": forgetting, "best": is_best, **scores, **retain_scores}
        self.history.append(record)
        if self.procs.is_main:
            checkpoint.append_metrics(self._path("metrics.jsonl"), record)
        return record

    def _path(self, name: str) -> Optional[Path]:
        return self.out / name if self.out is not None else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "trainable": {n: fsdp.snapshot(p) for n, p in self.named},
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": checkpoint.rng_state(),
            "samplers": {k: s.state_dict() for k, s in self.samplers.items()},
            "monitor": self.monitor.state_dict(),
            "history": self.history,
            "bad_steps": self.bad_steps,
            "since_eval": list(self.since_eval),
            "seconds": self._seconds(),
            "world": self.procs.world,
        }

    def load_state_dict(self, state: dict, source: Path = Path("checkpoint")) -> None:
        params = dict(self.named)
        state = checkpoint.with_current_names(state)
        checkpoint.check_world(state, self.procs.world, source)
        checkpoint.check_names(state["trainable"], params, source)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
        self.best = state["best"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        checkpoint.set_rng_state(state["rng"])
        for k, s in self.samplers.items():
            s.load_state_dict(state["samplers"][k])
        self.monitor.load_state_dict(state["monitor"])
        self.history, self.step, self.bad_steps = list(state["history"]), state["step"], state["bad_steps"]
        self.seconds_before = state["seconds"]
        self.since_eval[:] = state["since_eval"]

    def _seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._clock

    def save_checkpoint(self) -> None:
        if self.out is not None and self.sharded:  # every process writes its shards (checkpoint.save_sharded)
            checkpoint.save_sharded(self.out, self.state_dict(), self.procs.rank, self.procs.is_main)
            self.last_saved = self.step
        elif self.out is not None and self.procs.is_main:
            checkpoint.save(self.out / "checkpoint.pt", self.state_dict())
            self.last_saved = self.step

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False) -> TrainResult:
        """Train to `steps`, an early stop, the forgetting budget, or Ctrl-C; restore the best adapter.
        With `resume`, continue from <out>/checkpoint.pt exactly where it was written."""
        cfg, self._clock = self.config, time.perf_counter()
        self.model.train()
        if resume:
            path = self.out / "checkpoint.pt"
            state = checkpoint.load(path)
            if self.sharded:  # the shards, read into this model's and optimizer's sharded tensors
                fsdp.initialize_optimizer_state(self.optimizer)
                state = checkpoint.load_sharded(self.out, state, self.state_dict(), self.procs.world, self.procs.rank)
            self.load_state_dict(state, path)
            self.last_saved = self.step
            if self.procs.is_main:
                checkpoint.truncate_metrics(self.out / "metrics.jsonl", self.step)
            self.log(f"resumed from {path} at step {self.step}")
        else:
            if self.out is not None and self.procs.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                checkpoint.truncate_metrics(self.out / "metrics.jsonl", -1)  # a fresh run starts a fresh file
            torch.manual_seed(cfg.seed)
            self._eval(None)
        with self._catching_interrupt():
            self._loop()
        stop = self.monitor.stop_reason or ("interrupted" if self._interrupted else "completed")
        self.save_checkpoint()
        if not self._interrupted:
            self._restore_best()
        return self._finish(stop, self._seconds())

    @contextlib.contextmanager
    def _catching_interrupt(self) -> Iterator[None]:
        """The first Ctrl-C finishes the current step and writes a checkpoint; a second one stops at once.
        Only the main thread may handle signals: elsewhere training runs with Ctrl-C left alone."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)
            self.log("interrupted: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _loop(self) -> None:
        cfg = self.config
        bar = _progress(cfg.steps, self.step, cfg.progressbar and self.procs.is_main)
        done = self.monitor.stop_reason is not None
        since_eval = self.since_eval
        while not done and self.step < cfg.steps and not self._interrupted:
            loss, norm = self._train_step()
            if math.isfinite(loss):
                since_eval.append(loss)
            if self.bad_steps >= cfg.max_bad_steps:
                bar.close()
                raise NonFiniteLoss(self._diverged_message())
            if self.step % cfg.log_every == 0 and self.procs.is_main:
                checkpoint.append_metrics(self._path("metrics.jsonl"), {
                    "kind": "train", "step": self.step, "train_loss": loss, "grad_norm": norm,
                    "lr": self.schedule.get_last_lr()[0]})
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                record = self._eval(sum(since_eval) / len(since_eval) if since_eval else None)
                since_eval.clear()
                done = self.monitor.stop_reason is not None
                shown = {k: f"{record[k]:.3f}" for k in ("val_loss", "retain_loss") if record[k] is not None}
                bar.set_postfix(shown, refresh=False)
            if cfg.save_every and self.step % cfg.save_every == 0 and not self._interrupted and not self.bad_steps:
                self.save_checkpoint()
            bar.set_description(f"loss {loss:.3f} lr {self.schedule.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
            if self.procs.world > 1:  # Ctrl-C reaches the processes at different steps: stop them at the same one
                flag = torch.tensor([float(self._interrupted)], device=self.procs.device)
                self._interrupted = bool(all_reduce_sum(flag, self.procs).item() > 0)
        bar.close()

    def _diverged_message(self) -> str:
        kept = (f"the last good checkpoint is {self.out / 'checkpoint.pt'} (step {self.last_saved})"
                if self.last_saved is not None else "no checkpoint was written")
        return (f"the loss or the gradients were not finite for {self.bad_steps} steps in a row (up to step "
                f"{self.step}); training stopped and {kept}. Try a lower learning rate, gradient clipping "
                "(max_grad_norm 1.0), fp32 precision, or look for empty or broken examples in the data")

    def _restore_best(self) -> None:
        if not self.best:
            return
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(self.best[n])

    def _finish(self, stop: str, seconds: float) -> TrainResult:
        best = next((h for h in self.history if h["step"] == self.monitor.best_step), self.history[0])
        first = self.history[0]
        result = TrainResult(self.step, stop, self.monitor.best_step, first["val_loss"], best["val_loss"],
                             first["retain_loss"], best["retain_loss"], seconds, self.history)
        if self.out is not None and self.sharded and not self._interrupted:
            with fsdp.gathered_trainable(self.model):  # every process gathers; one writes
                if self.procs.is_main:
                    self._save_trained()
        if self.out is not None and self.procs.is_main:
            if not self._interrupted and not self.sharded:
                self._save_trained()
            atomic_write(self.out / "result.json", lambda p: Path(p).write_text(json.dumps(result.to_dict(), indent=2)))
            plot_curves({"run": self.history}, self.out / "curves.png", self.log)
        self.log(f"{stop}; kept step {result.best_step}: validation loss {result.val_loss_before:.4f} -> "
                 f"{result.val_loss_after:.4f}" + (f", retain loss {result.retain_loss_before:.4f} -> "
                                                   f"{result.retain_loss_after:.4f}"
                                                   if result.retain_loss_before is not None else ""))
        return result

    def _save_trained(self) -> None:
        """The kept adapter in PEFT's format; a plain model's trainable weights as safetensors."""
        if isinstance(self.model, LoraModel):
            self.model.save_pretrained(self.out / "adapter", selected_adapters=list(self.model.active_adapters))
        else:
            from safetensors.torch import save_file

            params = dict(self.model.named_parameters())  # whole ones, inside fsdp.gathered_trainable
            state = {n: params[n].detach().contiguous().cpu() for n, _ in self.named}
            atomic_write(self.out / "adapter" / "model.safetensors", lambda p: save_file(state, p))


class _NoBar:
    def set_postfix(self, *a, **k): ...
    def set_description(self, *a, **k): ...
    def update(self, *a, **k): ...
    def close(self): ...


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False, disable=None)  # None: off without a terminal
