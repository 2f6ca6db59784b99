r"""Many adapters, one per domain, trained together: one pass over the frozen base for all of them.

Each optimizer step takes b_a rows of each running adapter a's training data (its own sampler and
seed, as a run of its own would) and runs them as one mixed batch: every row through the base once,
each adapter's low-rank work on its own rows (mixing.add_own_paths). With N_a the scored tokens of
adapter a's rows in the global batch:

    L      = Σ_b S_b / N_a(b)                     S_b: row b's summed loss, a(b) its adapter
    ∇θ_a L = Σ over a's rows of ∇θ_a S_b / N_a   adapter a's weights only ever see its own rows
    clip ∇θ_a L to max_grad_norm, skip a's update if its norm is not finite; AdamW

which is the gradient a run of adapter a alone takes on the same rows: the mean over its own
tokens. Each row's 1 / N_a multiplies the gradient where the backward pass starts (`rows_scaled`),
as a run of its own divides its loss, so the two compute the same numbers in the same order. AdamW works parameter by
parameter, so one optimizer over all adapters is one optimizer per adapter, and a parameter without
a gradient (an adapter that stopped) is not touched. The learning-rate schedule is a function of the
step, the same for every adapter.

Every `eval_every` steps each running adapter is evaluated on its own validation set and retain set
with that adapter alone acting, and has its own forgetting monitor (monitor.py). An adapter that
stops (early stop, forgetting budget) gets its best weights back at once and leaves the batches; the
others go on. The run ends when every adapter has stopped or at `steps`.

How many rows each adapter gets per step (G = batch_size × grad_accum × processes):

    adapter_mix="equal"          b_a = G / n
    adapter_mix="proportional"   b_a ∝ |train_a|, largest remainders, at least 1

Saved: <out>/adapters/<name>/ (PEFT format, one directory per adapter), and <out>/adapters/routing.json,
which `TagRouter.load` reads: texts tagged "<domain=NAME>" go to adapter NAME.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from .. import mixing
from ..files import atomic_write
from ..model import LoraModel, get_peft_model
from ..modules_to_save import ModulesToSave
from ..routing import TagRouter
from . import checkpoint
from .batches import Sampler
from .chunked_loss import transformers_model
from .data import Examples
from .distributed import all_reduce_gradients, all_reduce_sum
from .monitor import Monitor
from .tasks import task_named
from .trainer import Trainer, TrainResult


@dataclass
class AdapterData:
    """One adapter's data: what it trains on, what picks its best step, what it must not forget."""

    train: Examples
    val: Examples
    retain: Optional[Examples] = None


@dataclass
class TogetherResult:
    """Each adapter's TrainResult, and the run's."""

    adapters: dict[str, TrainResult]
    steps_done: int
    stop_reason: str  # "completed", "every adapter stopped", or "interrupted"
    seconds: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def rows_per_adapter(sizes: dict[str, int], global_batch: int, mix: str) -> dict[str, int]:
    """b_a for each adapter (see the module docstring); refuses what cannot give every adapter a row."""
    n = len(sizes)
    if global_batch < n:
        raise ValueError(f"a step of {global_batch} rows cannot give each of the {n} adapters a row: raise "
                         f"--batch-size to at least {n}")
    if mix == "equal":
        if global_batch % n:
            raise ValueError(f"adapter_mix='equal' splits the {global_batch} rows of a step evenly, and {n} adapters "
                             f"do not divide them: use a batch that {n} divides, or adapter_mix='proportional'")
        return {a: global_batch // n for a in sizes}
    total = sum(sizes.values())
    shares = {a: max(1, math.floor(global_batch * s / total)) for a, s in sizes.items()}
    spare = global_batch - sum(shares.values())
    by_remainder = sorted(sizes, key=lambda a: -(global_batch * sizes[a] / total - shares[a]))
    for a in by_remainder[:max(0, spare)]:
        shares[a] += 1
    while sum(shares.values()) > global_batch:  # the at-least-one rows came from the largest
        largest = max(shares, key=shares.get)
        shares[largest] -= 1
    return shares


def one_adapter_each(model: nn.Module, names: list[str], config) -> LoraModel:
    """`model` (a transformers model) wrapped with an adapter of `config` under each name, every one
    initialised from the random state at the call: the weights a run of its own would start from."""
    start, wrapped = torch.get_rng_state(), None
    for name in names:
        torch.set_rng_state(start)
        if wrapped is None:
            wrapped = get_peft_model(model, copy.deepcopy(config), adapter_name=name)
        else:
            wrapped.add_adapter(name, copy.deepcopy(config))
    return wrapped


class TogetherTrainer(Trainer):
    """Trains adapter `name` on `domains[name]` for every name, in one pass (see the module docstring).
    `model` is a LoraModel holding one adapter per domain; each trains, nothing else does."""

    def __init__(self, model: LoraModel, config, domains: dict[str, AdapterData], out=None, log=print, processes=None):
        _check(model, config, domains)
        first = next(iter(domains.values()))
        others = [a for a in model.peft_config if a not in domains]
        if others:
            model.set_requires_grad(others, False)
        model.set_requires_grad(list(domains), True)  # every domain's adapter trains, active or not
        super().__init__(model, config, first.train, first.val, out=out, log=log, processes=processes)
        self.domains = domains
        self.batch_rows = rows_per_adapter({a: len(d.train) for a, d in domains.items()}, self.global_batch,
                                           config.adapter_mix)
        for a, d in domains.items():
            if self.batch_rows[a] > len(d.train):
                raise ValueError(f"adapter {a!r} takes {self.batch_rows[a]} rows a step but has {len(d.train)} training "
                                 "examples: add data, lower --batch-size, or use adapter_mix='proportional'")
        self.samplers = {f"train:{a}": Sampler(len(d.train), config.seed) for a, d in domains.items()}
        self.adapter_params = {a: list(model._params[a]) for a in domains}
        self.owner = {n: a for a in domains for n, p in self.named if any(p is q for q in model._params[a])}
        head = transformers_model(model).get_output_embeddings()
        if self.chunked and isinstance(head, ModulesToSave):  # each row's own head copy: the chunked loss
            self.chunked = False  # runs one head over every row, so the logits are formed here
            log("the plain loss, with every logit at once: the adapters train their own copies of the head")
        self.monitor = Monitors({a: Monitor(config.patience, config.min_delta, config.forgetting_budget)
                                 for a in domains})

    # ------------------------------------------------------------------ batches
    def running(self) -> list[str]:
        return [a for a in self.domains if not self.monitor.of[a].stop_reason]

    def _global_batch(self, step: int) -> dict:
        """The rows of this step: b_a of each running adapter's examples, adapter by adapter, with the
        adapter of each row under "adapter" (a list of names)."""
        parts, names = [], []
        for a in self.running():
            parts.append(self.domains[a].train.rows(self.samplers[f"train:{a}"].take(self.batch_rows[a])))
            names += [a] * self.batch_rows[a]
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {**rows, "adapter": names}

    def _micro_batches(self, rows: dict):
        """This process's micro-batches: the global batch cut into grad_accum × world near-equal slices;
        slice (j·world + rank) is micro-batch j of rank r."""
        parts, world, rank = self.config.grad_accum * self.procs.world, self.procs.world, self.procs.rank
        size = -(-len(rows["adapter"]) // parts)
        for j in range(self.config.grad_accum):
            start = (j * world + rank) * size
            if start < len(rows["adapter"]):
                yield {k: (v[start:start + size] if k == "adapter" else v[start:start + size].to(self.procs.device))
                       for k, v in rows.items()}

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> tuple[float, float]:
        """One optimizer step for every running adapter; (mean loss per scored token, largest ‖g_a‖)."""
        task, running = self.task, self.running()
        rows = self._global_batch(self.step + 1)
        tokens = {a: task.count(_rows_of(rows, a)) for a in running}  # N_a, over the global batch
        scale = {a: 1.0 / tokens[a].to(self.procs.device, torch.float32) for a in running}  # 1 / N_a
        total = torch.zeros((), device=self.procs.device)
        for m in self._micro_batches(rows):
            names = m.pop("adapter")
            weights = torch.stack([scale[a] for a in names])  # (b,): each row's 1 / N_a
            with self._autocast(), self.model.adapters_per_row(names), rows_scaled(self.model, weights, self.chunked):
                summed = task.summed_loss(self.model, m, self.chunked)
            summed.backward()
            total += summed.detach()
        params = [p for a in running for p in self.adapter_params[a]]
        all_reduce_gradients(params, self.procs)
        loss = all_reduce_sum(total, self.procs).item() / max(1, sum(int(n) for n in tokens.values()))
        norms = {}
        for a in running:
            grads = [p.grad for p in self.adapter_params[a] if p.grad is not None]
            norms[a] = (torch.nn.utils.clip_grad_norm_(self.adapter_params[a], self.config.max_grad_norm).item()
                        if self.config.max_grad_norm > 0 else
                        torch.norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0)
            if not math.isfinite(norms[a]):
                for p in self.adapter_params[a]:
                    p.grad = None  # this adapter's update is skipped
        if all(math.isfinite(v) for v in norms.values()):
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.log(f"step {self.step + 1}: gradient norms {norms}: the adapters whose norm is not finite skip "
                     "this step, the others take it")
        self.optimizer.step()  # a parameter without a gradient is left alone
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, max(norms.values(), default=0.0)

    # ------------------------------------------------------------------ evaluation
    def _eval(self, train_loss: Optional[float]) -> dict:
        per_adapter = {}
        for a in self.running():
            domain = self.domains[a]
            with self.model.adapters_acting([a]):
                val = self.evaluate(domain.val)
                retain = self.evaluate(domain.retain) if domain.retain is not None else None
            monitor = self.monitor.of[a]
            is_best = monitor.observe(self.step, val, retain)
            if is_best or self.step == 0:
                self.best.update({n: p.detach().clone() for n, p in self.named if self.owner[n] == a})
            per_adapter[a] = {"val_loss": val, "retain_loss": retain, "forgetting": monitor.forgetting(retain),
                              "best": is_best, "stopped": monitor.stop_reason}
            if monitor.stop_reason:
                self._restore_best(a)
                self.log(f"adapter {a}: {monitor.stop_reason}; the others go on")
        record = {"kind": "eval", "step": self.step, "train_loss": train_loss, "lr": self.schedule.get_last_lr()[0],
                  "val_loss": _mean(r["val_loss"] for r in per_adapter.values()),
                  "retain_loss": _mean(r["retain_loss"] for r in per_adapter.values()), "adapters": per_adapter}
        self.history.append(record)
        if self.procs.is_main:
            checkpoint.append_metrics(self._path("metrics.jsonl"), record)
        return record

    def _restore_best(self, adapter: Optional[str] = None) -> None:
        with torch.no_grad():
            for n, p in self.named:
                if n in self.best and (adapter is None or self.owner[n] == adapter):
                    p.copy_(self.best[n])

    # ------------------------------------------------------------------ the end
    def _finish(self, stop: str, seconds: float) -> TogetherResult:
        results = {a: self._result_of(a, seconds) for a in self.domains}
        if stop == "completed" and all(m.stop_reason for m in self.monitor.of.values()):
            stop = "every adapter stopped"
        result = TogetherResult(results, self.step, stop, seconds, self.history)
        if self.out is not None and self.procs.is_main:
            if not self._interrupted:
                self._save_trained()
            atomic_write(self.out / "result.json", lambda p: Path(p).write_text(json.dumps(result.to_dict(), indent=2)))
        for a, r in results.items():
            self.log(f"adapter {a}: {r.stop_reason}; kept step {r.best_step}: validation loss {r.val_loss_before:.4f} "
                     f"-> {r.val_loss_after:.4f}" + (f", retain loss {r.retain_loss_before:.4f} -> "
                                                     f"{r.retain_loss_after:.4f}" if r.retain_loss_before is not None
                                                     else ""))
        return result

    def _result_of(self, a: str, seconds: float) -> TrainResult:
        monitor = self.monitor.of[a]
        history = [{"step": h["step"], "train_loss": h["train_loss"], **h["adapters"][a]}
                   for h in self.history if a in h["adapters"]]
        best = next((h for h in history if h["step"] == monitor.best_step), history[0])
        return TrainResult(history[-1]["step"], monitor.stop_reason or "completed", monitor.best_step,
                           history[0]["val_loss"], best["val_loss"], history[0]["retain_loss"], best["retain_loss"],
                           seconds, history)

    def _save_trained(self) -> None:
        """Each adapter in PEFT's format under <out>/adapters/<name>, and the tag router's config."""
        folder = self.out / "adapters"
        self.model.save_pretrained(folder, selected_adapters=list(self.domains))
        TagRouter(adapters=list(self.domains)).save(folder / "routing.json")


class Monitors:
    """One Monitor per adapter, seen by the trainer's loop as one: it stops when every adapter has."""

    def __init__(self, monitors: dict[str, Monitor]):
        self.of = monitors

    @property
    def stop_reason(self) -> Optional[str]:
        reasons = [m.stop_reason for m in self.of.values()]
        return "every adapter stopped" if all(reasons) else None

    @property
    def best_step(self) -> int:
        return max(m.best_step for m in self.of.values())

    def state_dict(self) -> dict:
        return {a: m.state_dict() for a, m in self.of.items()}

    def load_state_dict(self, state: dict) -> None:
        for a, m in self.of.items():
            m.load_state_dict(state[a])


@contextlib.contextmanager
def rows_scaled(model, weights: torch.Tensor, chunked: bool) -> Iterator[None]:
    """In this block's backward passes, the gradient where the loss hands it to the model is multiplied
    row by row by `weights` (B,): the loss as Σ_b w_b · (row b's summed loss). That place is the
    logits (B, T, V), the head's output, or with the chunked loss (which forms no logits; its head is
    the model's own, never an adapter's copy) the last hidden states (B, T, H) the head reads.

    The scale goes in where a run of its own divides its loss by N, before any weight's gradient is
    formed, and it is one multiplication of what the loss hands on, as that division is: so the two
    compute the same numbers, instead of gradients divided after the sum."""
    hf = transformers_model(model)
    if chunked:
        module = hf.get_decoder() if getattr(hf.config, "is_encoder_decoder", False) else hf.base_model
    else:
        module = hf.get_output_embeddings()
    if module is None or module is hf:
        raise ValueError(f"{type(hf).__name__} has no module whose output carries each row's loss to scale; train "
                         "its adapters one at a time")

    def scale(module, args, out):
        first = out if isinstance(out, torch.Tensor) else out[0]  # (B, T, ·): logits, or a ModelOutput's first field
        if first.requires_grad:
            first.register_hook(lambda g: g * weights.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))

    handle = module.register_forward_hook(scale)
    try:
        yield
    finally:
        handle.remove()


def _rows_of(rows: dict, adapter: str) -> dict:
    index = torch.tensor([i for i, n in enumerate(rows["adapter"]) if n == adapter])
    return {k: v[index] for k, v in rows.items() if k != "adapter"}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _check(model, config, domains: dict[str, AdapterData]) -> None:
    """Refuse what one pass cannot train as separate runs would, with what to do."""
    if not isinstance(model, LoraModel):
        raise TypeError("training adapters together needs a LoraModel holding one adapter per domain "
                        "(get_peft_model, then add_adapter for each)")
    if len(domains) < 1:
        raise ValueError("give at least one domain: {adapter name: AdapterData(train, val, retain)}")
    missing = [a for a in domains if a not in model.peft_config]
    if missing:
        raise ValueError(f"the model has no adapter {missing[0]!r} (it has {sorted(model.peft_config)}): add one per "
                         "domain with add_adapter(name, config)")
    if mixing.BASE in domains:
        raise ValueError(f"{mixing.BASE!r} means the base model and cannot be trained: name the domain's adapter")
    if config.parallel == "fsdp":
        raise ValueError("adapters trained together run under DDP (--parallel ddp): each adapter's gradient norm "
                         "would need its own reduction over FSDP's shards")
    if config.replay_ratio > 0:
        raise ValueError("replay mixes one replay set into one adapter's batches; with several adapters give each its "
                         "own retain set instead, or train them one at a time to replay")
    if task_named(config.task).has_labels or config.task == "preference":
        raise ValueError(f"--task {config.task} trains a shared head or a reference: train its adapters one at a time")
    for a, d in domains.items():
        if not isinstance(d, AdapterData):
            raise TypeError(f"domain {a!r}: expected an AdapterData(train, val, retain), got {type(d).__name__}")
    ours = {id(p) for a in domains for p in model._params[a]}
    shared = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ours
              and not any(p is q for a in model.peft_config for q in model._params[a])]
    if shared:
        raise ValueError(f"{shared[0]} trains and belongs to no adapter (a trainable head or embedding): with "
                         "adapters trained together each trainable weight must be one adapter's; freeze it")
