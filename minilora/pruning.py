r"""Pruning after fine-tuning: zero a fraction of a merged model's linear weights.

    report = prune(model, sparsity=0.5, method="wanda", pattern="2:4", calibration=batches)

Every weight W (d_out × d_in, GPT-2's Conv1D seen through its transpose) gets a score S of the same
shape, and the lowest-scoring entries are set to zero:

    magnitude   S_ij = |W_ij|
    wanda       S_ij = |W_ij| · ‖X_j‖₂     X: the layer's inputs on the calibration batches, all tokens
                                          (Sun et al. 2023, "A Simple and Effective Pruning Approach")

Which entries compete with which (the comparison group):

    pattern="unstructured", scope="layer"    each layer loses ⌊s · numel⌋ entries; magnitude ranks the
                                             whole layer, wanda ranks each output row (the paper's group)
    pattern="unstructured", scope="global"   one threshold over every pruned layer's scores
    pattern="2:4"                            every group of 4 consecutive inputs of a row keeps its 2
                                             best: exactly 50 %, the layout that
                                             torch.sparse.to_sparse_semi_structured accepts for a
                                             (d_out, d_in) weight (needs d_in divisible by 4)

The report says, per layer, the sparsity reached and how much the layer's output moved on the
calibration inputs, ‖X (W − W')ᵀ‖_F / ‖X Wᵀ‖_F, measured on up to `report_tokens` of the layer's
input rows (the inputs of the unpruned model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn as nn

from . import renamed
from .roles import is_linear

# Legend: d_out, d_in = a layer's output and input features; N = calibration tokens kept for the report.

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")
SCOPES = ("layer", "global")


@dataclass
class LayerPruning:
    """What pruning did to one layer."""

    name: str  # module path
    shape: tuple  # (d_out, d_in)
    sparsity: float  # fraction of the weight's entries that are zero afterwards
    output_change: Optional[float]  # ‖X ΔWᵀ‖ / ‖X Wᵀ‖ on the calibration inputs; None without calibration


@dataclass
class PruneReport:
    """The whole model's pruning: the request and each layer's result."""

    method: str  # "magnitude" | "wanda"
    pattern: str  # "unstructured" | "2:4"
    scope: str  # "layer" | "global"
    sparsity_requested: float  # the fraction asked for
    sparsity_reached: float  # zeros / entries over the pruned layers
    layers: list[LayerPruning] = field(default_factory=list)  # one per pruned layer, in model order

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A markdown table, one row per layer."""
        rows = ["| layer | shape | sparsity | output change |", "|---|---|---:|---:|"]
        for layer in self.layers:
            change = "—" if layer.output_change is None else f"{layer.output_change:.4f}"
            rows.append(f"| {layer.name} | {layer.shape[0]}×{layer.shape[1]} | {layer.sparsity:.3f} | {change} |")
        return "\n".join(rows)


def check_request(sparsity: float, method: str, pattern: str, scope: str) -> None:
    """Refuse an impossible request, saying what is accepted."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1) (0.5 zeroes half the weights), got {sparsity!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if pattern == "2:4" and sparsity != 0.5:
        raise ValueError(f"pattern='2:4' keeps 2 of every 4 weights, exactly sparsity 0.5; got sparsity={sparsity}. "
                         "Pass sparsity=0.5, or pattern='unstructured' for another fraction")


def prunable_layers(model: nn.Module, skip_modules: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Path → Linear / Conv1D with a plain weight: all but the output head and `skip_modules`."""
    if any(getattr(m, "LINEAR_LIKE", False) or hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("prune works on a plain model with full-precision weights; this one has LoRA or 4-bit "
                         "layers. merge_and_unload() the adapter (dequantize a 4-bit base first), then prune")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = list(skip_modules)
    return {name: m for name, m in model.named_modules()
            if is_linear(m) and m is not head and not any(name == s or name.endswith("." + s) for s in skip)}


def weight_view(layer: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in), sharing memory: nn.Linear's own, Conv1D's transposed."""
    return layer.weight.data if isinstance(layer, nn.Linear) else layer.weight.data.t()


class _Calibration:
    """Forward hooks that gather, per layer, Σ x_j² over all tokens and up to `keep` input rows."""

    def __init__(self, layers: dict[str, nn.Module], keep: int):
        self.square_sums = {name: None for name in layers}  # name -> (d_in,) fp32
        self.samples = {name: [] for name in layers}  # name -> [(n, d_in)], Σn ≤ keep
        self.keep = keep
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, d_in)
            sums = x.square().sum(dim=0)  # (d_in,)
            self.square_sums[name] = sums if self.square_sums[name] is None else self.square_sums[name] + sums
            room = self.keep - sum(s.shape[0] for s in self.samples[name])
            if room > 0:
                self.samples[name].append(x[:room].clone())
        return record

    def close(self):
        for handle in self.handles:
            handle.remove()


def run_calibration(model: nn.Module, layers: dict[str, nn.Module], batches, keep: int) -> _Calibration:
    """Run the model on each batch (a dict of model inputs, or an input_ids tensor) with hooks on."""
    calibration = _Calibration(layers, keep)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        calibration.close()
    missing = [name for name, sums in calibration.square_sums.items() if sums is None]
    if missing:
        raise ValueError(f"the calibration batches never reached {missing[:3]}: give batches the model runs on "
                         "(dicts of model inputs or input_ids tensors)")
    return calibration


def scores(W: torch.Tensor, method: str, square_sum: Optional[torch.Tensor]) -> torch.Tensor:
    """S: |W| or |W| · ‖X_j‖. (d_out, d_in)."""
    if method == "magnitude":
        return W.abs().float()
    return W.abs().float() * square_sum.sqrt()[None, :]  # (d_out, d_in) * (1, d_in)


def keep_mask(S: torch.Tensor, sparsity: float, pattern: str, per_row: bool,
              threshold: Optional[float] = None) -> torch.Tensor:
    """True where the weight survives. (d_out, d_in) -> (d_out, d_in) bool."""
    d_out, d_in = S.shape
    if pattern == "2:4":
        groups = S.reshape(d_out, d_in // 4, 4)  # (d_out, d_in/4, 4)
        best = groups.topk(2, dim=-1).indices  # (d_out, d_in/4, 2)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
        return mask.reshape(d_out, d_in)
    if threshold is not None:  # global scope: one cut for every layer
        return S > threshold
    if per_row:
        k = int(sparsity * d_in)  # entries dropped per row
        mask = torch.ones_like(S, dtype=torch.bool)
        if k:
            mask.scatter_(1, S.topk(k, dim=1, largest=False).indices, False)
        return mask
    k = int(sparsity * S.numel())
    mask = torch.ones(S.numel(), dtype=torch.bool, device=S.device)
    if k:
        mask[S.reshape(-1).topk(k, largest=False).indices] = False
    return mask.reshape(S.shape)


def prune(model: nn.Module, sparsity: float = 0.5, method: str = "magnitude", pattern: str = "unstructured",
          scope: str = "layer", calibration=None, skip_modules: Optional[list[str]] = None,
          report_tokens: int = 512, progressbar: bool = False, progress: Optional[bool] = None) -> PruneReport:
    """Zero the lowest-scoring `sparsity` of each linear weight of a merged model, in place (see the
    module docstring). `calibration`: batches (dicts of model inputs or input_ids tensors), needed by
    wanda and by the report's output change. `progressbar`: a bar over the layers (`progress=`, the
    earlier name, still works for one release). Returns the per-layer report."""
    progressbar = renamed.earlier_keyword("prune", "progress", "progressbar", progress, progressbar)
    check_request(sparsity, method, pattern, scope)
    layers = prunable_layers(model, skip_modules or [])
    if not layers:
        raise ValueError("no Linear or Conv1D layer to prune in this model (the output head is never pruned)")
    if pattern == "2:4":
        odd = [(name, tuple(weight_view(m).shape)) for name, m in layers.items() if weight_view(m).shape[1] % 4]
        if odd:
            raise ValueError(f"pattern='2:4' needs every layer's input dimension divisible by 4; {odd[0][0]} has "
                             f"weight shape (d_out, d_in) = {odd[0][1]}. Skip it (skip_modules=[...]) or prune "
                             "unstructured")
    if method == "wanda" and calibration is None:
        raise ValueError("method='wanda' weighs each weight by its input's norm: pass calibration= batches "
                         "(a few dicts of model inputs or input_ids tensors)")
    gathered = run_calibration(model, layers, calibration, report_tokens) if calibration is not None else None
    square_sums = gathered.square_sums if gathered else {name: None for name in layers}
    threshold = None
    if scope == "global" and pattern == "unstructured" and sparsity > 0:
        everything = torch.cat([scores(weight_view(m), method, square_sums[n]).reshape(-1) for n, m in layers.items()])
        k = int(sparsity * everything.numel())
        threshold = everything.kthvalue(k).values.item() if k else float("-inf")
        del everything
    report = PruneReport(method, pattern, scope, float(sparsity), 0.0)
    zeros = total = 0
    names = list(layers)
    if progressbar:
        from tqdm.auto import tqdm
        names = tqdm(names, desc="prune", unit="layer", leave=False, disable=None)
    for name in names:
        W = weight_view(layers[name])  # (d_out, d_in), the layer's own memory
        mask = keep_mask(scores(W, method, square_sums[name]), sparsity, pattern, per_row=method == "wanda",
                         threshold=threshold) if sparsity > 0 else torch.ones_like(W, dtype=torch.bool)
        change = None
        if gathered is not None:
            X = torch.cat(gathered.samples[name])  # (N, d_in)
            removed = X @ (W.float() * ~mask).t()  # (N, d_in) @ (d_in, d_out) -> (N, d_out)
            change = (removed.norm() / (X @ W.float().t()).norm().clamp(min=1e-30)).item()
        with torch.no_grad():
            W.mul_(mask.to(W.dtype))
        layer_zeros = int((W == 0).sum())
        zeros, total = zeros + layer_zeros, total + W.numel()
        report.layers.append(LayerPruning(name, tuple(W.shape), layer_zeros / W.numel(), change))
    report.sparsity_reached = zeros / total
    return report


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive entries along the last dim has at most 2 non-zeros."""
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())

