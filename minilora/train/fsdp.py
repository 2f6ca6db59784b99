r"""Fully sharded data parallel (PyTorch's FSDP2, `fully_shard`) over a frozen NF4 or dense base.

Each of the `world` processes keeps 1/world of every parameter (dim 0 cut in equal chunks, the
last one shorter); a unit's parameters are all-gathered just before the unit runs and freed after
it, in the forward pass and again in the backward pass. Units: one per decoder layer, the input
embedding, the output head, and the root (the final norm and whatever else is left):

    process r holds   [embedding]/world  [layer 0]/world  …  [head]/world  [root]/world    always
    forward, layer i: all-gather(layer i) → run → free                            one layer at a time
    backward, layer i: all-gather(layer i) → grads → reduce-scatter → free

Gradients. The trainer divides the loss by the token count of the *global* batch, so the gradient
is the *sum* over processes; FSDP2 averages by default, so the divide factor is set to 1:

    g_shard(r) = Σ_processes (∇loss)[rows of shard r]

NF4 base. `Linear4bit.make_shardable` stores the codes as uint8 [n_blocks, blocksize/2] and the
scales as [n_blocks]: dim-0 shards are whole blocks with their scales, whatever the world size
(the last shard is shorter, or empty). The dense weight is rebuilt inside the layer's product only.

Dtype rule. A unit all-gathers its parameters in one collective of bytes, so frozen uint8 codes,
uint8 / fp32 scales and trainable fp32 adapters can share a unit. Its *trainable* parameters must
share one dtype (the reduce-scatter of gradients is one flat buffer): `shard_model` refuses a unit
that mixes them, naming both. No FSDP mixed-precision policy is set (it would cast the codes);
compute in bf16 comes from autocast (`precision`) and NF4Config.compute_dtype.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..quant import Linear4bit
from .distributed import Processes


class ShardingError(ValueError):
    """The model cannot be sharded as asked."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the modules of the classes the model declares unsplittable
    (`_no_split_modules`, as transformers' device maps use them), else the items of its longest ModuleList."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head, each a unit of its own (a large vocabulary would make
    the root unit, gathered for the whole step, as big as several layers); none when they share their
    weight (tied: one tensor must stay in one unit, the root)."""
    for owner in model.modules():  # the outermost module that has both (a transformers model)
        if hasattr(owner, "get_output_embeddings") and owner.get_output_embeddings() is not None:
            inputs, outputs = owner.get_input_embeddings(), owner.get_output_embeddings()
            if getattr(inputs, "weight", None) is getattr(outputs, "weight", None):
                return []
            return [inputs, outputs]
    return []


def check_unit_dtypes(unit: nn.Module, owned: list[tuple[str, nn.Parameter]]) -> None:
    """One dtype for the trainable parameters of a unit (see the module docstring)."""
    trainable = {}
    for name, p in owned:
        if p.requires_grad:
            if not p.is_floating_point():
                raise ShardingError(f"{name} is a trainable {p.dtype} parameter: only floating tensors train; "
                                    "freeze it (requires_grad=False)")
            trainable.setdefault(p.dtype, name)
    if len(trainable) > 1:
        (d1, n1), (d2, n2) = list(trainable.items())[:2]
        raise ShardingError(f"one FSDP unit ({type(unit).__name__}) trains parameters of two dtypes: {n1} is {d1}, "
                            f"{n2} is {d2}; FSDP reduces a unit's gradients in one buffer of one dtype. Cast the "
                            "adapters to one dtype (model.float()), and use precision bf16 for bf16 compute")


def shard_model(model: nn.Module, procs: Processes) -> nn.Module:
    """Shard `model` in place across the processes: one FSDP2 unit per decoder layer, one for the input
    embedding and one for the output head (when not tied), and the root (final norm and the rest).
    Call it after moving the model to its device and before creating the optimizer."""
    layers = decoder_layers(model)
    if not layers:
        raise ShardingError(f"found no decoder layers in {type(model).__name__} to shard (no _no_split_modules, "
                            "no ModuleList); use --parallel ddp for this model")
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.make_shardable()
    depth = {id(m): name.count(".") + bool(name) for name, m in model.named_modules()}
    units = {id(m): m for m in layers + embedding_units(model)}  # each once
    layers = sorted(units.values(), key=lambda m: -depth[id(m)])  # innermost first: FSDP wraps bottom-up
    inner = {id(p) for layer in layers for p in layer.parameters()}
    for layer in layers:
        check_unit_dtypes(layer, list(layer.named_parameters()))
    check_unit_dtypes(model, [(n, p) for n, p in model.named_parameters() if id(p) not in inner])
    mesh = init_device_mesh(procs.device.type, (procs.world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum over processes: the loss is already / N_global
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process (a collective: every process must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_bytes(model: nn.Module, frozen_only: bool = True) -> int:
    """Bytes this process holds of the model's (frozen) parameters and buffers: its shards only."""
    tensors = [p for p in model.parameters() if not (frozen_only and p.requires_grad)] + list(model.buffers())
    return sum(local(t).numel() * t.element_size() for t in tensors)


@contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[None]:
    """Inside, every trainable parameter is a whole, plain tensor (gathered from the shards), so code
    that reads parameters (save_pretrained) sees what one process would; the shards come back after.
    A collective: every process enters it."""
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                module._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """‖g‖ over every process's shards, and g scaled to at most `max_norm` (0: no clipping).

        ‖g‖² = Σ_processes Σ_{local shards} ‖g_shard‖²            one all-reduce of one number"""
    grads = [local(p.grad) for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        squares += g.double().pow(2).sum()
    meshes = [p.grad.device_mesh for p in params if isinstance(p.grad, DTensor)]
    if meshes:
        torch.distributed.all_reduce(squares, group=meshes[0].get_group())
    norm = squares.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s factor
        for g in grads:
            g.mul_(scale)
    return norm


LAUNCH = ("--parallel fsdp shards the model across processes that torchrun starts; launch it as\n"
          "    torchrun --nproc_per_node=2 -m minilora.cli finetune --model DIR --data FILE --parallel fsdp\n"
          "(on several machines: --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT on each), or drop "
          "--parallel fsdp to train in one process")


def check_launch() -> None:
    """FSDP needs at least two processes started by torchrun (WORLD_SIZE in the environment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ShardingError(LAUNCH)


def snapshot(p: torch.Tensor) -> torch.Tensor:
    """A detached copy of a parameter: on the CPU when it is whole, a sharded copy when sharded."""
    return p.detach().clone() if isinstance(p, DTensor) else p.detach().to("cpu", copy=True)


@torch.no_grad()
def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its (zero) optimizer state, shaped and sharded like the parameter, so that a
    sharded checkpoint can be read into it: one step on zero gradients at learning rate 0 (which changes
    no parameter, and whose step counts the checkpoint then overwrites)."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p in params:
        p.grad = None
