r"""Compiled hotswap: switch, replace and mix adapters without torch.compile tracing anything again.

A compiled graph is specialised on the Python values it reads. The plain forward pass reads which
adapters are active (names looked up in ModuleDicts), each adapter's rank (its weights' shapes)
and its scale (a float), so dynamo compiles one graph per adapter. After

    prepare_model_for_compiled_hotswap(model, target_rank=R, max_adapters=S)

each adapted linear layer reads instead, for each set of output rows its adapters write (a part:
GPT-2's q or v, or the whole layer),

    A_stack (S + 1, R, d_in)       slot k: adapter k's A, zero-padded to rank R; slot 0 zeros
    B_stack (S + 1, d_part, R)     slot k: s_k · B_k, zero-padded; the scale lives in the tensor

and one index tensor that the whole model shares,

    slot (1,) int64                the slot every row runs; set_adapter writes it in place

    y[..., part] += (x A_stack[slot]ᵀ) B_stack[slot]ᵀ        (N, d_in) @ (d_in, R) @ (R, d_part)

Zero padding changes nothing: (x Aᵀ) Bᵀ = Σ_j (x a_j) b_jᵀ over the rows a_j of A and columns b_j
of B, and the padded ones are zero. Every shape is fixed by (S, R, the target set) and every value
a switch changes sits in a tensor, so one compiled graph serves every adapter:

    set_adapter(name)                          writes `slot`: nothing is copied
    load_adapter(path, name, hotswap=True)     replaces adapter `name`'s weights, then its slot
    forward(..., adapter_names=[...])          a slot per row, (B,): A_stack[rows] (B, R, d_in), two bmm

The stacks are the serving copy of the adapters' weights, in non-persistent buffers: state dicts
and files are what they were. minilora's calls that change an adapter (add, load, hotswap,
set_peft_model_state_dict, delete) write its slot; set_adapter and mixed batches first copy in any
adapter whose weights were changed in place since (their version counters moved). A prepared model
serves: its adapters are frozen and stay so. What a graph cannot take without recompiling (a
larger rank, a layer or part outside the target set, more adapters than slots, DoRA or a bias,
weighted mixes) is refused with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import copy
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import adapter_files, mixing
from .adapter_layer import AdapterLayer
from .modules_to_save import ModulesToSave
from .roles import walk
from .surgery import plan_adapter, trained_biases


@dataclass(eq=False)
class Hotswap:
    """What a prepared model shares across its layers (AdapterState.hotswap)."""

    rank: int  # R: the largest rank an adapter may have
    slots: list[Optional[str]]  # slots[k - 1]: the adapter in slot k (None: free); slot 0 is zeros
    slot: torch.Tensor  # (1,) int64: the slot every row uses unless the call routes rows
    layers: dict = field(default_factory=dict)  # module path -> LoraLinear, the target set
    stored: dict = field(default_factory=dict)  # adapter -> (its weights, their version counters when stored)

    def slot_of(self, name: str) -> int:
        return self.slots.index(name) + 1


def prepare_model_for_compiled_hotswap(model, *, target_rank: Optional[int] = None, config=None,
                                       check_compiled: str = "error", max_adapters: Optional[int] = None) -> None:
    """PEFT's call, before compiling: fix the largest rank (`target_rank`, default the largest
    loaded), the number of adapters served (`max_adapters`, minilora's; default those loaded) and
    the target set (the layers and parts adapted now), then stack every adapter into its slot.
    `config`: PEFT pads its configs' ranks to `target_rank`; minilora keeps each adapter's own
    rank (only the stacks are padded), so configs and files are left as they are.
    `check_compiled`: "error" (PEFT's default), "warn" or "ignore" when `model` is compiled already."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod"):
        if check_compiled == "error":
            raise ValueError("call prepare_model_for_compiled_hotswap before compiling the model, on the model itself")
        if check_compiled == "warn":
            warnings.warn("the model is compiled already: the graphs traced so far do not read the hotswap slots and "
                          "will be traced again", stacklevel=2)
        model = model._orig_mod
    model = getattr(model, "_owner", model)  # PEFT's peft_model.base_model is accepted too
    if not hasattr(model, "peft_config") or not hasattr(model, "_state"):
        raise TypeError(f"prepare_model_for_compiled_hotswap takes a minilora LoraModel (get_peft_model), got "
                        f"{type(model).__name__}")
    state = model._state
    if state.hotswap is not None:
        raise ValueError("this model is already prepared for compiled hotswap; prepare it once, before compiling")
    layers = {path: m for path, m in walk(model.model) if getattr(m, "serves_hotswap", False) and m.adapter_names}
    others = sorted(path for path, m in walk(model.model)
                    if isinstance(m, (AdapterLayer, ModulesToSave)) and path not in layers
                    and any(m.has_adapter(n) for n in model.peft_config))
    if not layers or others:
        raise ValueError(f"compiled hotswap serves LoRA on linear layers; {others or 'no linear layer'} "
                         "holds adapters of another kind (embedding, convolution, expert weights, a trained copy "
                         "or trainable tokens): leave them out of the adapters to hotswap")
    names = list(model.peft_config)
    ranks = {n: max(p.r for layer in layers.values() if layer.has_adapter(n) for p in layer.parts[n].values())
             for n in names}
    rank = target_rank if target_rank is not None else max(ranks.values())
    slots = max_adapters if max_adapters is not None else len(names)
    if not isinstance(rank, int) or rank < 1 or not isinstance(slots, int) or slots < max(len(names), 1):
        raise ValueError(f"target_rank must be a positive integer and max_adapters at least the {len(names)} adapters "
                         f"loaded, got target_rank={target_rank!r}, max_adapters={max_adapters!r}")
    for name in names:
        check_adapter(model, name, rank, layers)
    if len(state.active) > 1:
        raise ValueError(f"adapters {list(state.active)} are active together; a hotswapped model runs one adapter "
                         "per row: set_adapter one of them, or combine them first with add_weighted_adapter")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("adapters are merged into the weights; call unmerge_adapter() before preparing for hotswap")
    first = next(iter(layers.values())).base_layer.weight
    hot = Hotswap(rank, list(names) + [None] * (slots - len(names)),
                  torch.zeros(1, dtype=torch.long, device=first.device), layers)
    for layer in layers.values():
        _allocate(layer, hot, slots)
    state.hotswap = hot
    for name in names:
        store(model, name)
        model.peft_config[name].inference_mode = True
    model._update_trainable(names, frozen=True)
    point(model, list(state.active))


def _allocate(layer, hot: Hotswap, slots: int) -> None:
    """The layer's zero stacks, one pair per set of rows its adapters write."""
    row_sets = []  # one part per set of rows, standing for every part over them
    for parts in layer.parts.values():
        for part in parts.values():
            if not any(part.same_rows(rows) for rows in row_sets):
                row_sets.append(part)
    weight = layer.pair(*next((n, p) for n in layer.parts for p in layer.parts[n]))[0].weight
    layer.hotswap_rows = row_sets
    for k, rows in enumerate(row_sets):
        kw = dict(dtype=weight.dtype, device=weight.device)
        layer.register_buffer(f"hotswap_A{k}", torch.zeros(slots + 1, hot.rank, layer.in_features, **kw), persistent=False)
        layer.register_buffer(f"hotswap_B{k}", torch.zeros(slots + 1, rows.width, hot.rank, **kw), persistent=False)


def check_adapter(model, name: str, rank: int, layers: dict, config=None, plan=None) -> None:
    """ValueError, naming what to do, if adapter `name` (loaded, or about to be from `plan`) needs a
    rank above `rank`, a layer or part outside the target set `layers`, or a variant."""
    config = config if config is not None else model.peft_config[name]
    used = [flag for flag in ("use_dora", "lora_bias") if getattr(config, flag, False)]
    if used or config.bias != "none" or config.modules_to_save or config.trainable_token_indices:
        raise ValueError(f"adapter {name!r} uses {used or 'biases, modules_to_save or trainable tokens'}, which compiled "
                         "hotswap does not serve: hotswap plain LoRA adapters")
    if plan is not None:
        wanted = {path: layer_plan.parts for path, layer_plan in plan.layers.items()}
    else:
        wanted = {path: layer.parts[name] for path, layer in model._lora_layers().items() if layer.has_adapter(name)}
    for path, parts in wanted.items():
        if path not in layers:
            raise ValueError(f"adapter {name!r} adapts {path}, outside the layers the model was prepared with; "
                             "prepare for hotswap after loading an adapter that targets every layer any will use")
        for part_name, part in parts.items():
            if part.r > rank:
                raise ValueError(f"adapter {name!r} has rank {part.r} at {path}, above the target_rank {rank} the model "
                                 f"was prepared with; prepare with target_rank={part.r} or more, before compiling")
            if not any(part.same_rows(rows) for rows in getattr(layers[path], "hotswap_rows", [part])):
                raise ValueError(f"adapter {name!r} adapts part {part_name!r} of {path}, which no adapter covered when "
                                 "the model was prepared; prepare after loading an adapter over the same parts")


def check_new(model, name: str, config, plan) -> None:
    """Before adapter `name` is added to a prepared model: a free slot, and a shape it can serve."""
    hot = model._state.hotswap
    if name not in hot.slots and None not in hot.slots:
        raise ValueError(f"all {len(hot.slots)} hotswap slots hold adapters; delete one, load this one with "
                         "hotswap=True in place of another, or prepare with a larger max_adapters before compiling")
    check_adapter(model, name, hot.rank, hot.layers, config, plan)


def store(model, name: str) -> None:
    """Copy adapter `name` into its slot (taking a free one if it has none) of every layer, and
    note the version counters of its weights (see `refresh`)."""
    hot = model._state.hotswap
    if name not in hot.slots:
        hot.slots[hot.slots.index(None)] = name
    k = hot.slot_of(name)
    for layer in hot.layers.values():
        _store_layer(layer, name, k)
    weights = [t for layer in hot.layers.values() if layer.has_adapter(name)
               for pair in layer.factors(name).values() for t in pair]
    hot.stored[name] = (weights, [t._version for t in weights])


@torch.no_grad()
def _store_layer(layer, name: str, k: int) -> None:
    parts = layer.parts.get(name, {})
    for i, rows in enumerate(layer.hotswap_rows):
        A_stack, B_stack = getattr(layer, f"hotswap_A{i}"), getattr(layer, f"hotswap_B{i}")
        A_stack[k].zero_()
        B_stack[k].zero_()
        for part_name, part in parts.items():
            if part.same_rows(rows):
                A, B = (m.weight for m in layer.pair(name, part_name))
                A_stack[k, :part.r] = A  # (r, d_in) into (R, d_in)
                B_stack[k, :, :part.r] = B * layer.part_scale(name, part_name)  # (d_part, r) into (d_part, R)


def refresh(model, names) -> None:
    """Store again the adapters of `names` whose weights were changed in place since they were
    stored (an optimizer step, load_state_dict, set_factors: each moves a version counter)."""
    hot = model._state.hotswap
    for name in names:
        weights, versions = hot.stored.get(name, ([], []))
        if name != mixing.BASE and [t._version for t in weights] != versions:
            store(model, name)


def forget(model, name: str) -> None:
    """Adapter `name` was deleted: its slot becomes zeros and free."""
    hot = model._state.hotswap
    k = hot.slot_of(name)
    for layer in hot.layers.values():
        _store_layer(layer, name, k)  # it holds no parts any more: zeros
    hot.stored.pop(name, None)
    hot.slots[k - 1] = None


def point(model, active: list[str]) -> None:
    """Make `active` (one adapter, or none) the active one: the shared slot ← its slot (0, zeros, for
    none), after storing it again if its weights changed in place."""
    hot = model._state.hotswap
    if len(active) > 1:
        raise ValueError(f"a model prepared for compiled hotswap runs one adapter per row, not {active} together: "
                         "set_adapter one name, pass adapter_names= per row, or combine them with add_weighted_adapter")
    if active:
        refresh(model, active)
    hot.slot.fill_(hot.slot_of(active[0]) if active else 0)
    model._state.active[:] = active


def row_routing(model, routing: mixing.Routing) -> mixing.Routing:
    """The call's routing with a slot per row, (B,) int64, in place of names a graph would specialise on."""
    hot = model._state.hotswap
    if routing.rows is None:
        raise ValueError("a model prepared for compiled hotswap serves one adapter per row (adapter_names=); "
                         "adapter_weights and routers mix adapters: combine them first with add_weighted_adapter")
    if not torch.compiler.is_compiling():  # a graph cannot read version counters
        refresh(model, set(routing.rows))
    slots = [0 if n == mixing.BASE else hot.slot_of(n) for n in routing.rows]
    return replace(routing, slots=torch.tensor(slots, device=hot.slot.device))


def replace_adapter(model, model_id, name: str, **load_options) -> None:
    """`load_adapter(model_id, name, hotswap=True)`: adapter `name` becomes the one saved in
    `model_id` (its weights, rank and scale), in its slot when the model is prepared; which adapter
    is active does not change. All or nothing: a file that does not fit leaves the old adapter."""
    model._check_exists([name])
    active = list(model._state.active)
    config = copy.deepcopy(model.peft_config[name])
    biases = trained_biases(model.model, config.bias)
    kept, _ = adapter_files.adapter_tensors(model._adapter_modules(name), name, config.use_rslora, biases)
    kept = {key: t.detach().clone() for key, t in kept.items()}
    model.delete_adapter(name)
    try:
        model.load_adapter(model_id, name, **load_options)
    except BaseException:
        model._register(name, config, plan_adapter(model.model, config))
        adapter_files.fill_adapter(model._adapter_modules(name), name, config.use_rslora, biases, kept,
                                   Path(str(model_id)))
        raise
    finally:
        model.set_adapter(active if active else name)


def hotswap_adapter(model, model_name_or_path, adapter_name: str, torch_device: Optional[str] = None,
                    **kwargs) -> None:
    """PEFT's function: replace adapter `adapter_name` of `model` (compiled or not) by the one saved in
    `model_name_or_path`, without recompiling a model prepared by prepare_model_for_compiled_hotswap."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = getattr(model, "_owner", model)  # PEFT's peft_model.base_model
    model.load_adapter(model_name_or_path, adapter_name, torch_device=torch_device, hotswap=True, **kwargs)
