r"""PagedAdamW: AdamW whose moments live on an offload device (the CPU) and visit the
accelerator one page at a time, never more than a budget of bytes at once.

The update is AdamW's (Loshchilov & Hutter, 2019), in the order torch.optim.AdamW computes it:

    θ ← θ · (1 − lr·λ)                                decoupled weight decay
    m ← β₁ m + (1 − β₁) g                             first moment  (lerp)
    v ← β₂ v + (1 − β₂) g²                            second moment
    v̂ ← max(v̂, v) if amsgrad else v
    θ ← θ − lr/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)

Memory. Adam keeps two fp32 moments per trainable parameter: 8 bytes each, twice the weights of a
bf16 model. QLoRA's third trick is to keep them off the accelerator. Here the moments live on
`offload_device` (pinned CPU memory when CUDA is around) and `step()` walks the parameters in
pages of about `page_bytes` of state:

    offload (CPU)  [ page 0 ][ page 1 ][ page 2 ] ...          all of m, v
                       │ copy in      ▲ copy back
                       ▼              │
    device         [ page k ]  update θ, m, v there; ≤ device_budget_bytes resident at any time

A page is made of element ranges of flattened parameters, so one huge parameter spans many pages
and the budget does not depend on the largest tensor. On CUDA the next page is copied in on a
side stream while the current one updates. With `update_on="offload"` the update itself runs on
the offload device instead (parameter and gradient slices visit it), and no state ever touches
the accelerator. When a parameter already lives on the offload device, "copying in" is a no-op
and the update runs in place: the same code path, with the accounting still exact.

Sharded parameters (FSDP2's DTensors): each process pages the moments of its own shard only. A
sharded parameter's moments are sharded alike (DTensors whose local pieces live on the offload
device), so the update is element-wise on the local pieces and needs no communication, and a
sharded checkpoint (torch.distributed.checkpoint) saves and reloads them shard by shard.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch.optim import Optimizer

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a PyTorch built without torch.distributed: nothing is ever sharded
    DTensor = None

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # torch.optim.AdamW's state names


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's piece of a sharded tensor; a whole tensor is its own piece."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def _sharded_like(piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`piece` (this process's part) as a tensor sharded like `param`; `piece` itself if `param` is whole."""
    if DTensor is None or not isinstance(param, DTensor):
        return piece
    return DTensor.from_local(piece, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


@dataclass
class _Slice:
    """Elements [start, end) of one flattened parameter (this process's piece of it), and its state."""

    param: torch.Tensor  # the local piece of the parameter
    grad: torch.Tensor  # ... of its gradient
    moments: dict  # ... of its moments, by name
    state: dict  # the optimizer state of the parameter (its step count)
    start: int
    end: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(-1)[self.start:self.end] if tensor.is_contiguous() else tensor


class PagedAdamW(Optimizer):
    """AdamW with CPU-resident moments, paged onto the device under a memory budget."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        page_bytes: int = 64 << 20,  # state bytes (all moments) per page
        device_budget_bytes: Optional[int] = None,  # most state bytes on the device at once; default 2 pages
        offload_device: str = "cpu",  # where the moments live
        update_on: str = "device",  # "device": page state in; "offload": page params and grads out
    ):
        # AdamW's own checks and messages
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if update_on not in ("device", "offload"):
            raise ValueError(f"update_on must be 'device' or 'offload', got {update_on!r}")
        if page_bytes < 64:
            raise ValueError(f"page_bytes must be at least 64, got {page_bytes}")
        if device_budget_bytes is None:
            device_budget_bytes = 2 * page_bytes
        if device_budget_bytes < page_bytes:
            raise ValueError(
                f"device_budget_bytes={device_budget_bytes} is smaller than one page (page_bytes={page_bytes}): "
                f"the minimum budget is {page_bytes} bytes; raise device_budget_bytes or lower page_bytes"
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)
        self.page_bytes = page_bytes
        self.device_budget_bytes = device_budget_bytes
        self.offload_device = torch.device(offload_device)
        self.update_on = update_on
        self.device_state_bytes = 0  # state bytes resident on the device now
        self.peak_device_state_bytes = 0  # ... and the most ever

    # ------------------------------------------------------------------ state
    def _state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            pin = p.is_cuda and self.offload_device.type == "cpu"
            state["step"] = torch.tensor(0.0)
            for name in MOMENTS[: 3 if amsgrad else 2]:
                piece = torch.zeros(_local(p).shape, dtype=p.dtype, device=self.offload_device, pin_memory=pin)
                state[name] = _sharded_like(piece, p)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts torch.optim.AdamW's state_dict too; moments go back to the offload device."""
        groups = state_dict.get("param_groups", [])
        mine = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g["params"]) for g in groups]
        if mine != theirs:
            raise ValueError(
                f"this state_dict has parameter groups of sizes {theirs}, the optimizer {mine}: it was saved for a "
                "different set of parameters"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for index, state in state_dict.get("state", {}).items():
            for name in MOMENTS:
                if name in state and tuple(state[name].shape) != tuple(params[index].shape):
                    raise ValueError(
                        f"state_dict: parameter {index} has {name} of shape {tuple(state[name].shape)} but the "
                        f"parameter has shape {tuple(params[index].shape)}: it was saved for a different layout"
                    )
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            pin = p.is_cuda and self.offload_device.type == "cpu"
            for name in MOMENTS:
                if name in state:
                    moved = _local(state[name]).to(self.offload_device, copy=True)  # never alias the caller's
                    state[name] = _sharded_like(moved.pin_memory() if pin and not moved.is_pinned() else moved, p)
            if "step" in state:
                state["step"] = state["step"].detach().float().cpu().clone()

    # ------------------------------------------------------------------ paging
    def _pages(self, params: list[torch.Tensor], amsgrad: bool) -> Iterator[list[_Slice]]:
        """Consecutive element ranges of the parameters, ≤ page_bytes of state each, one device each."""
        page, room, device = [], 0, None
        for whole in params:
            p, grad, state = _local(whole), _local(whole.grad), self.state[whole]
            moments = {name: _local(state[name]) for name in MOMENTS if name in state}
            capacity = max(1, self.page_bytes // ((3 if amsgrad else 2) * p.element_size()))
            if page and p.device != device:  # a page never mixes devices
                yield page
                page = []
            if not page:
                room, device = capacity, p.device
            if not p.is_contiguous():  # cannot be cut into ranges: a page of its own
                if page:
                    yield page
                yield [_Slice(p, grad, moments, state, 0, p.numel())]
                page = []
                continue
            start = 0
            while start < p.numel():
                take = min(room, p.numel() - start)
                page.append(_Slice(p, grad, moments, state, start, start + take))
                start, room = start + take, room - take
                if room == 0:
                    yield page
                    page, room = [], capacity
        if page:
            yield page

    def _page_bytes(self, page: list[_Slice], amsgrad: bool) -> int:
        return sum((s.end - s.start) * s.param.element_size() for s in page) * (3 if amsgrad else 2)

    def _fetch(self, page: list[_Slice], amsgrad: bool, stream) -> dict:
        """Bring one page's moments to its device (or its params and grads to the offload device)."""
        names = MOMENTS[: 3 if amsgrad else 2]
        moments = {n: [s.view(s.moments[n]) for s in page] for n in names}  # on the offload device
        params = [s.view(s.param.data) for s in page]
        grads = [s.view(s.grad) for s in page]
        nbytes = self._page_bytes(page, amsgrad)
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context:
            if self.update_on == "device":
                device = page[0].param.device
                work = {n: [t.to(device, non_blocking=True) for t in ts] for n, ts in moments.items()}
                self._account(+nbytes)
                work_params, work_grads = params, grads
            else:
                work = moments
                work_params = [t.to(self.offload_device, non_blocking=True) for t in params]
                work_grads = [t.to(self.offload_device, non_blocking=True) for t in grads]
            event = stream.record_event() if stream is not None else None
        return dict(page=page, moments=moments, work=work, params=params, work_params=work_params,
                    work_grads=work_grads, bytes=nbytes, event=event)

    def _write_back(self, fetched: dict) -> None:
        for name, targets in fetched["moments"].items():
            for target, work in zip(targets, fetched["work"][name]):
                if work is not target:
                    target.copy_(work, non_blocking=True)
        for target, work in zip(fetched["params"], fetched["work_params"]):
            if work is not target:
                target.copy_(work, non_blocking=True)
        if self.update_on == "device":
            self._account(-fetched["bytes"])

    def _account(self, delta: int) -> None:
        self.device_state_bytes += delta
        self.peak_device_state_bytes = max(self.peak_device_state_bytes, self.device_state_bytes)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            params = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients, please consider SparseAdam instead")
                state = self._state(p, amsgrad)
                state["step"] += 1
                params.append(p)
            self._step_group(params, group)
        return loss

    def _step_group(self, params: list[torch.Tensor], group: dict) -> None:
        amsgrad = group["amsgrad"]
        cuda = any(p.is_cuda for p in params) and self.update_on == "device"
        page_max = max((self._page_bytes(pg, amsgrad) for pg in self._pages(params, amsgrad)), default=0)
        if self.update_on == "device" and page_max > self.device_budget_bytes:
            raise ValueError(
                f"a non-contiguous parameter needs {page_max} bytes of state at once, more than "
                f"device_budget_bytes={self.device_budget_bytes}; make it contiguous or raise the budget"
            )
        prefetch = cuda and 2 * page_max <= self.device_budget_bytes  # room for the next page too
        side = torch.cuda.Stream() if prefetch else None
        pages = self._pages(params, amsgrad)
        current = next(pages, None)
        fetched = self._fetch(current, amsgrad, side) if current is not None else None
        while fetched is not None:
            upcoming = next(pages, None)
            ahead = self._fetch(upcoming, amsgrad, side) if (upcoming is not None and prefetch) else None
            if fetched["event"] is not None:
                torch.cuda.current_stream().wait_event(fetched["event"])
            steps = [s.state["step"].item() for s in fetched["page"]]
            adamw_update(fetched["work_params"], fetched["work_grads"], fetched["work"], steps, group)
            self._write_back(fetched)
            if upcoming is not None and ahead is None:
                ahead = self._fetch(upcoming, amsgrad, None)
            fetched = ahead
        if any(p.is_cuda for p in params):
            torch.cuda.current_stream().synchronize()  # the non-blocking copies back have landed

    def state_bytes(self) -> int:
        """Bytes of optimizer state in all (on the offload device)."""
        return sum(_local(t).numel() * t.element_size() for s in self.state.values() for n, t in s.items()
                   if n in MOMENTS)


def adamw_update(params, grads, moments: dict, steps: list[float], group: dict) -> None:
    """One AdamW update over lists of tensors (slices), in torch.optim.AdamW's order of operations."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    exp_avgs, exp_avg_sqs = moments["exp_avg"], moments["exp_avg_sq"]
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)  # θ ← θ(1 − lr·λ)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m ← β₁m + (1 − β₁)g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)  # v ← β₂v + (1 − β₂)g²
    if group["amsgrad"]:
        torch._foreach_maximum_(moments["max_exp_avg_sq"], exp_avg_sqs)
        exp_avg_sqs = moments["max_exp_avg_sq"]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)  # √v̂ / √(1 − β₂ᵗ) + ε
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in steps])
