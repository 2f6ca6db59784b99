"""Data parallel training through `torch.distributed`, launched by `torchrun`.

Every process holds the whole (frozen) model and trains the same adapter on its own share of each
global batch. After the backward pass only the trainable gradients are summed across processes, in
one all-reduce of one flat buffer; the loss is already divided by the token count of the *global*
batch, so the sum is exactly the gradient a single process would get from the whole batch:

    g = Σ_ranks Σ_{tokens of the rank} ∇ℓ_t / N_global

Backends: gloo on the CPU, nccl on CUDA. Without torchrun (no WORLD_SIZE) it is one process and
nothing is communicated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0  # this process, 0 … world − 1
    world: int = 1  # how many processes train together
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0


def setup() -> Processes:
    """Join the process group torchrun describes in the environment (idempotent); one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Processes(rank=rank, world=dist.get_world_size(), device=device)


def all_reduce_sum(value: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum over processes of a tensor (returned; the input is left as it is)."""
    if procs.world == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_gradients(params: list[torch.Tensor], procs: Processes) -> None:
    """Sum the gradients of the trainable parameters over processes, in place, in one message."""
    if procs.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def barrier(procs: Processes) -> None:
    """Wait until every process gets here."""
    if procs.world > 1:
        dist.barrier()


def teardown() -> None:
    """Leave the process group, once everyone is done (a group left to the interpreter's exit can
    abort the process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
