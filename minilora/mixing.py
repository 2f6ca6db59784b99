r"""Several adapters in one forward pass: per-row adapters (mixed batches) and weighted mixing.

Mixed batch: row b of the batch uses adapter a(b) (or "__base__", no adapter):

    y_b = x_b Wᵀ + s_a(b) · (x_b A_a(b)ᵀ) B_a(b)ᵀ

computed for all rows at once: the A and B of the adapters in the batch are stacked (ranks padded
with zeros, scale folded into B, a zero entry for "__base__"), gathered per row, and applied with
two batched matmuls, so the cost barely grows with the number of distinct adapters (the other
way, "segments", runs each adapter's rows through their own matmuls; the benchmark measures both):

    A_rows (B, r, d_in)  = A_stack[idx]        h = x · A_rowsᵀ   (B, T, d_in) @ (B, d_in, r) -> (B, T, r)
    B_rows (B, d, r)     = B_stack[idx]        y += h · B_rowsᵀ  (B, T, r) @ (B, r, d)    -> (B, T, d)

Weighted mixing: y = x Wᵀ + Σ_a w_a · s_a · (x A_aᵀ) B_aᵀ, each adapter's low-rank path weighted.

`LoraModel.forward(..., adapter_names=[...])` / `(..., adapter_weights={...})` set a context that
every LoRALinear reads during that one call.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

BASE = "__base__"  # the row runs the base model, no adapter


@dataclass(frozen=True)
class Routing:
    """How adapters apply during one forward call."""

    rows: Optional[tuple[str, ...]] = None  # one adapter name (or BASE) per batch row
    method: str = "gather"  # rows: "gather" (stacked weights, batched matmuls) or "segments" (per adapter)
    row_index: dict = field(default_factory=dict, compare=False)  # per call: adapter set -> row indices
    weights: Optional[dict[str, float]] = None  # adapter -> weight of its low-rank path
    mixture: Optional[tuple[tuple[str, ...], torch.Tensor]] = None  # (adapters, weights (B, n) or (B, T, n))


_current: contextvars.ContextVar[Optional[Routing]] = contextvars.ContextVar("minilora_routing", default=None)


def current() -> Optional[Routing]:
    return _current.get()


@contextlib.contextmanager
def routed(routing: Routing) -> Iterator[None]:
    token = _current.set(routing)
    try:
        yield
    finally:
        _current.reset(token)


def _stacks(layer, entries: tuple, d_part: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (n+1, r_max, d_in) and B·s (n+1, d_part, r_max) of the (adapter, part) entries, index 0 all
    zeros. Cached on the layer and rebuilt when a weight changes (its version counter moves), when
    the layer moves, or when adapters are added or deleted (LoRALinear drops the cache then)."""
    weights = [(layer.lora_A[n][p].weight, layer.lora_B[n][p].weight) for n, p in entries]
    versions = tuple((a._version, b._version) for a, b in weights)
    cache = layer.__dict__.setdefault("_stack_cache", {})
    key = (entries, dtype, weights[0][0].device)
    if key in cache and cache[key][0] == versions:
        return cache[key][1]
    r_max = max(a.shape[0] for a, _ in weights)
    device = weights[0][0].device
    A_stack = torch.zeros(len(entries) + 1, r_max, layer.in_features, dtype=dtype, device=device)
    B_stack = torch.zeros(len(entries) + 1, d_part, r_max, dtype=dtype, device=device)
    with torch.no_grad():
        for i, ((n, p), (a, b)) in enumerate(zip(entries, weights), start=1):
            A_stack[i, : a.shape[0]] = a.to(dtype)  # zero-padded ranks change nothing
            B_stack[i, :, : a.shape[0]] = b.to(dtype) * layer.scaling[n][p]
    if len(cache) > 64:  # a bounded cache: mixed batches tend to repeat their adapter sets
        cache.clear()
    cache[key] = (versions, (A_stack, B_stack))
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
    y3 = y.reshape(batch, -1, layer.out_features)  # (B, T, d_out), added to in place (eval mode)
    if routing.method == "segments":  # the alternative: each adapter's rows as one segment, its own matmuls
        for name in used:
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            x_rows = x3[idx]  # (b, T, d_in)
            for part, (first, end) in layer.spans[name].items():
                A, B = layer.lora_A[name][part].weight, layer.lora_B[name][part].weight
                delta = (x_rows.to(A.dtype) @ A.t()) @ B.t() * layer.scaling[name][part]  # (b, T, d_part)
                y3[idx, :, first:end] += delta.to(y3.dtype)
        return y3.view(y.shape)
    spans = dict.fromkeys(span for n in used for span in layer.spans[n].values())
    for first, end in spans:
        entries = tuple((n, p) for n in used for p, span in layer.spans[n].items() if span == (first, end))
        A_stack, B_stack = _stacks(layer, entries, end - first, x.dtype)
        idx = routing.row_index.get(entries)  # the same for every layer with this adapter set
        if idx is None:
            index = {n: i for i, (n, _) in enumerate(entries, start=1)}
            idx = routing.row_index[entries] = torch.tensor([index.get(n, 0) for n in rows], device=x.device)  # (B,)
        h = torch.bmm(x3, A_stack[idx].transpose(1, 2))  # (B, T, d_in) @ (B, d_in, r) -> (B, T, r)
        y3[..., first:end] += torch.bmm(h, B_stack[idx].transpose(1, 2)).to(y3.dtype)  # (B, T, r) @ (B, r, d)
    return y3.view(y.shape)  # y itself when contiguous; the copy reshape made otherwise


def add_mixture(layer, y: torch.Tensor, x: torch.Tensor, names: tuple[str, ...], weights: torch.Tensor) -> torch.Tensor:
    """y + Σ_a weights[..., a] · s_a (x A_aᵀ) B_aᵀ: each row (or token) mixes the adapters by its own
    weights, (B, n) per sequence or (B, T, n) per token."""
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, layer.in_features)  # (B, T, d_in)
    out = y.reshape(batch, -1, layer.out_features)  # (B, T, d_out)
    w = weights.unsqueeze(1) if weights.dim() == 2 else weights  # (B, 1 or T, n)
    for a, name in enumerate(names):
        if name not in layer.lora_A:
            continue
        for part, (first, end) in layer.spans[name].items():
            h = x3.to(layer.lora_A[name][part].weight.dtype) @ layer.lora_A[name][part].weight.t()  # (B, T, r)
            delta = (h @ layer.lora_B[name][part].weight.t()) * layer.scaling[name][part]  # (B, T, d_part)
            pad = (first, layer.out_features - end)
            out = out + torch.nn.functional.pad(delta * w[..., a:a + 1], pad).to(out.dtype)
    return out.view(y.shape)

