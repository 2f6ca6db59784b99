r"""Several adapters in one forward pass: per-row adapters (mixed batches) and weighted mixing.

Mixed batch: row b of the batch uses adapter a(b) (or "__base__", no adapter):

    y_b = x_b Wᵀ + s_a(b) · (x_b A_a(b)ᵀ) B_a(b)ᵀ

computed in inference for all rows at once: the A and B of the adapters in the batch are stacked
(ranks padded with zeros, scale folded into B, a zero entry for "__base__"), gathered per row, and
applied with two batched matmuls, so the cost barely grows with the number of distinct adapters
(the other way, "segments", runs each adapter's rows through their own matmuls; the benchmark
measures both). In training (and for DoRA and lora_bias) each adapter's rows run through that
adapter's own path instead (`add_own_paths`), so that each row's gradient reaches its own adapter:

    A_rows (B, r, d_in)  = A_stack[idx]        h = x · A_rowsᵀ   (B, T, d_in) @ (B, d_in, r) -> (B, T, r)
    B_rows (B, d, r)     = B_stack[idx]        y += h · B_rowsᵀ  (B, T, r) @ (B, r, d)    -> (B, T, d)

Weighted mixing: y = x Wᵀ + Σ_a w_a · s_a · (x A_aᵀ) B_aᵀ, each adapter's low-rank path weighted.

`LoraModel.forward(..., adapter_names=[...])` / `(..., adapter_weights={...})` put a `Routing` in
the model's AdapterState for that one call; each LoraLinear then hands its work to `apply`.
Nothing here reads global or context-local state, so a compiled model traces straight through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


BASE = "__base__"  # the row runs the base model, no adapter


@dataclass
class Mixture:
    """Per-row (or per-token) weights over adapters, filled in during the forward pass by a router
    (routing.LoraRouter) before the first adapted layer that should use them."""

    adapters: tuple[str, ...]  # the adapters mixed, in the order of the weights' last axis
    weights: Optional[torch.Tensor] = None  # (B, n) per sequence or (B, T, n) per token; None: not yet


@dataclass(frozen=True)
class Routing:
    """How adapters apply during one forward call; exactly one of rows, weights, mixture is set."""

    rows: Optional[tuple[str, ...]] = None  # one adapter name (or BASE) per batch row
    method: str = "gather"  # rows: "gather" (stacked weights, batched matmuls) or "segments" (per adapter)
    row_index: dict = field(default_factory=dict, compare=False)  # per call: adapter set -> row indices
    weights: Optional[dict[str, float]] = None  # adapter -> weight of its low-rank path
    mixture: Optional[Mixture] = None  # weights per row or token, from a router
    slots: Optional[torch.Tensor] = None  # rows of a model prepared for hotswap: (B,) int64, a slot per row


def apply(layer, y: torch.Tensor, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y (the base layer's output) plus the low-rank paths that `routing` chooses, for one layer."""
    if routing.rows is not None:
        return add_rows(layer, y, x, routing)
    if routing.mixture is not None:
        return add_mixture(layer, y, x, routing.mixture)
    for name, weight in routing.weights.items():
        if name in layer.lora_A:
            y = layer.add_lora(y, x, name, weight)
    return y


def forget_stacks(layer) -> None:
    """Drop the layer's cached mixed-batch stacks (its adapters changed)."""
    layer.__dict__.pop("_stack_cache", None)


def _stacks(layer, entries: tuple, d_part: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (n+1, r_max, d_in) and B·s (n+1, d_part, r_max) of the (adapter, part) entries, index 0 all
    zeros. Cached on the layer and rebuilt when a weight changes (its version counter moves), when
    the layer moves, or when adapters are added or deleted (LoraLinear drops the cache then)."""
    weights = [tuple(module.weight for module in layer.pair(n, p)) for n, p in entries]
    if torch.compiler.is_compiling():  # a compiled graph builds the stacks itself: nothing to cache
        return _build_stacks(layer, entries, weights, d_part, dtype)
    versions = tuple((a._version, b._version) for a, b in weights)
    cache = layer.__dict__.setdefault("_stack_cache", {})
    key = (entries, dtype, weights[0][0].device)
    if key in cache and cache[key][0] == versions:
        return cache[key][1]
    stacks = _build_stacks(layer, entries, weights, d_part, dtype)
    if len(cache) > 64:  # a bounded cache: mixed batches tend to repeat their adapter sets
        cache.clear()
    cache[key] = (versions, stacks)
    return stacks


def _build_stacks(layer, entries: tuple, weights: list, d_part: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    r_max = max(a.shape[0] for a, _ in weights)
    device = weights[0][0].device
    A_stack = torch.zeros(len(entries) + 1, r_max, layer.in_features, dtype=dtype, device=device)
    B_stack = torch.zeros(len(entries) + 1, d_part, r_max, dtype=dtype, device=device)
    with torch.no_grad():
        for i, ((n, p), (a, b)) in enumerate(zip(entries, weights), start=1):
            A_stack[i, : a.shape[0]] = a.to(dtype)  # zero-padded ranks change nothing
            B_stack[i, :, : a.shape[0]] = b.to(dtype) * layer.part_scale(n, p)
    return A_stack, B_stack


def add_rows(layer, y: torch.Tensor, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y (B, ..., d_out) plus, for each row b, adapter rows[b]'s low-rank path on x (B, ..., d_in)."""
    rows, batch = routing.rows, x.shape[0]
    if batch != len(rows):
        raise ValueError(
            f"adapter_names has {len(rows)} entries but this layer sees a batch of {batch} rows; give one name per "
            "row (beam search and other row-expanding generation are not supported with adapter_names)"
        )
    used = [n for n in dict.fromkeys(rows) if n != BASE and n in layer.lora_A]
    if not used:
        return y
    x3 = x.reshape(batch, -1, layer.in_features)  # (B, T, d_in)
    if own_paths(layer, used):
        return add_own_paths(layer, y.reshape(batch, -1, layer.out_features), x3, routing, used).view(y.shape)
    y3 = y.reshape(batch, -1, layer.out_features)  # (B, T, d_out), added to in place (eval mode)
    if routing.method == "segments":  # the alternative: each adapter's rows as one segment, its own matmuls
        for name in used:
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            x_rows = x3[idx]  # (b, T, d_in)
            for part_name, part in layer.parts[name].items():
                A, B = (module.weight for module in layer.pair(name, part_name))
                delta = (x_rows.to(A.dtype) @ A.t()) @ B.t() * layer.part_scale(name, part_name)  # (b, T, d_part)
                routed = y3[idx]  # (b, T, d_out), a copy of the routed rows
                part.rows(routed).add_(delta.to(y3.dtype).view(part.rows(routed).shape))
                y3[idx] = routed
        return y3.view(y.shape)
    columns = {(part.first, part.end, part.blocks): part for n in used for part in layer.parts[n].values()}
    for like in columns.values():  # adapters' parts over the same rows share one pair of batched matmuls
        entries = tuple((n, p) for n in used for p, part in layer.parts[n].items() if part.same_rows(like))
        A_stack, B_stack = _stacks(layer, entries, like.width, x.dtype)
        idx = routing.row_index.get(entries)  # the same for every layer with this adapter set
        if idx is None:
            index = {n: i for i, (n, _) in enumerate(entries, start=1)}
            idx = routing.row_index[entries] = torch.tensor([index.get(n, 0) for n in rows], device=x.device)  # (B,)
        add_gathered(y3, x3, A_stack, B_stack, idx, like)
    return y3.view(y.shape)  # y itself when contiguous; the copy reshape made otherwise


def own_paths(layer, used: list[str]) -> bool:
    """Whether each adapter's rows must run through the adapter's own path (`add_own_paths`): in
    training (its dropout acts, its gradients flow), when gradients reach an adapter, and for an
    adapter with a variant (DoRA, lora_bias), whose change the stacked matmuls do not express."""
    if layer.training or any(layer.variants_of(n) for n in used):
        return True
    return torch.is_grad_enabled() and any(p.requires_grad for n in used for p in layer.adapter_parameters(n))


def add_own_paths(layer, y3: torch.Tensor, x3: torch.Tensor, routing: Routing, used: list[str]) -> torch.Tensor:
    """y3 (B, T, d_out) with each adapter's rows replaced by what the layer gives those rows with that
    adapter alone (`layer.add_lora`: dropout, DoRA, lora_bias included), out of place:

        out[rows(a)] = add_lora(y3[rows(a)], x3[rows(a)], a)       for each adapter a in the batch

    The same numbers as running each adapter's rows in a call of their own, and differentiable: a
    row's loss reaches its own adapter's weights and no other's (adapter a's weights only ever see
    rows(a)). The low-rank work is one segment per adapter; the base ran once for every row. Rows
    that come adapter by adapter (as the together trainer lays them out) are read as views and
    joined by one concatenation; others are gathered, and put back in order by one index."""
    segments, inverse = rows_by_adapter(routing, x3.device)
    pieces = [layer.add_lora(y3[rows], x3[rows], name) if name in used else y3[rows] for name, rows in segments]
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (B, T, d_out), the rows grouped by adapter
    return out if inverse is None else out[inverse]


def rows_by_adapter(routing: Routing, device) -> tuple[list, Optional[torch.Tensor]]:
    """[(adapter, its rows: a slice, or an index tensor)] in the order the rows are grouped, and the
    permutation that puts the grouped rows back (None when each adapter's rows are contiguous
    already). The same for every layer of a call: computed once."""
    key = ("segments", device)
    if key not in routing.row_index:
        names = routing.rows
        groups = list(dict.fromkeys(names))
        starts = [i for i in range(len(names)) if i == 0 or names[i] != names[i - 1]]
        if len(starts) == len(groups):  # one run of rows per adapter: views
            ends = starts[1:] + [len(names)]
            routing.row_index[key] = ([(names[a], slice(a, b)) for a, b in zip(starts, ends)], None)
        else:
            order = sorted(range(len(names)), key=lambda i: groups.index(names[i]))  # stable: rows keep their order
            segments = [(g, torch.tensor([i for i in order if names[i] == g], device=device)) for g in groups]
            inverse = torch.empty(len(names), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(names))
            routing.row_index[key] = (segments, inverse.to(device))
    return routing.row_index[key]


def add_gathered(y3: torch.Tensor, x3: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor,
                 idx: torch.Tensor, rows) -> None:
    """y3 (B, T, d_out), in place: the `rows` part of each row b gains (x3[b] A_stack[idx[b]]ᵀ) B_stack[idx[b]]ᵀ.
    A_stack (n, r, d_in), B_stack (n, d_part, r) with the scale folded in, idx (B,) int64."""
    h = torch.bmm(x3, A_stack[idx].transpose(1, 2))  # (B, T, d_in) @ (B, d_in, r) -> (B, T, r)
    delta = torch.bmm(h, B_stack[idx].transpose(1, 2)).to(y3.dtype)  # (B, T, r) @ (B, r, d_part)
    part_view = rows.rows(y3)  # (B, T, blocks, d_part / blocks), a view of y3
    part_view += delta.view(part_view.shape)


def add_mixture(layer, y: torch.Tensor, x: torch.Tensor, mixture: Mixture) -> torch.Tensor:
    """y + Σ_a weights[..., a] · s_a (x A_aᵀ) B_aᵀ: each row (or token) mixes the adapters by its own
    weights, (B, n) per sequence or (B, T, n) per token. Before the router has set them: y."""
    if mixture.weights is None:
        return y
    names, weights = mixture.adapters, mixture.weights
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, layer.in_features)  # (B, T, d_in)
    out = y.reshape(batch, -1, layer.out_features)  # (B, T, d_out)
    w = weights.unsqueeze(1) if weights.dim() == 2 else weights  # (B, 1 or T, n)
    for a, name in enumerate(names):
        if name not in layer.lora_A:
            continue
        for part_name, part in layer.parts[name].items():
            A, B = (module.weight for module in layer.pair(name, part_name))
            h = x3.to(A.dtype) @ A.t()  # (B, T, d_in) @ (d_in, r) -> (B, T, r)
            delta = (h @ B.t()) * layer.part_scale(name, part_name)  # (B, T, d_part)
            pad = (part.first, layer.out_features // part.blocks - part.end)  # zeros around the part in each block
            blocked = (delta * w[..., a:a + 1]).unflatten(-1, (part.blocks, -1))  # (B, T, blocks, d_part / blocks)
            out = out + torch.nn.functional.pad(blocked, pad).flatten(-2).to(out.dtype)
    return out.view(y.shape)


def routing_for(adapter_names, adapter_weights, known: set[str], rows: Optional[int], method: str) -> Routing:
    """The Routing of one call's `adapter_names` (one adapter, or BASE, per batch row) or
    `adapter_weights` ({adapter: weight}), every value checked against the `known` adapters and
    the batch's `rows` (None: unknown)."""
    if adapter_names is not None and adapter_weights is not None:
        raise ValueError("give adapter_names (one adapter per row) or adapter_weights (a mix), not both")
    if isinstance(adapter_names, str):
        raise ValueError(f"adapter_names takes one adapter name per batch row, got the string {adapter_names!r}; "
                         f"pass [{adapter_names!r}] * batch_size, or set_adapter({adapter_names!r}) for every row")
    if adapter_weights is not None and not isinstance(adapter_weights, dict):
        raise ValueError(f"adapter_weights maps adapter names to weights, got {adapter_weights!r}")
    chosen = list(adapter_names) if adapter_names is not None else list(adapter_weights)
    unknown = sorted({n for n in chosen if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {sorted(known)} (and '__base__')")
    if adapter_weights is not None:
        bad = {n: w for n, w in adapter_weights.items()
               if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w)}
        if bad:
            raise ValueError(f"adapter_weights must map adapter names to finite numbers, got {bad}")
        return Routing(weights={n: float(w) for n, w in adapter_weights.items() if n != BASE})
    if rows is not None and rows != len(chosen):
        raise ValueError(f"adapter_names has {len(chosen)} entries but the batch has {rows} rows: give one per row")
    return Routing(rows=tuple(chosen), method=method)
