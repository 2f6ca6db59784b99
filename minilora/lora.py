r"""LoraLinear: a frozen Linear (or GPT-2 Conv1D) plus low-rank adapters.

The math (Hu et al., 2021, "LoRA", section 4.1), one convention for the whole project:

    W' = W + (alpha / r) · B · A          A ∈ R^{r × d_in},  B ∈ R^{d_out × r}
    y  = x Wᵀ + b + (alpha / r) · (dropout(x) Aᵀ) Bᵀ

B starts at zero, so a fresh adapter changes nothing, bit for bit. With `use_rslora` the scale is
alpha / sqrt(r) (Kalajdzievski, 2023), which keeps the update's size steady as r grows.

                 ┌──────────── W (frozen) ────────────┐
       x ───┬───►│  x Wᵀ + b                           │──────────► (+) ──► y
            │    └─────────────────────────────────────┘             ▲
            └──► dropout ──► Aᵀ (d_in → r) ──► Bᵀ (r → d_out) ──► × α/r

Fused projections. GPT-2 computes q, k and v with one matrix, `c_attn`: its output is
[ q | k | v ]. Putting LoRA on Q and V only means one (A, B) pair per chosen *part*, each writing
into its own columns of y; K's columns are never touched, not in the forward pass and not by
merge. The low-rank path runs on activations; the dense ΔW is built only by `merge()`.

    y = [ q | k | v ]      q += α/r · (x A_qᵀ) B_qᵀ      v += α/r · (x A_vᵀ) B_vᵀ      k as it was

Other models interleave their fused output: GPT-NeoX and Bloom compute [q_h k_h v_h] for each head
h, Falcon's new architecture [q × heads/kv, k, v] for each kv head. There a part is the same rows
[first, end) of each of `blocks` equal blocks, and the low-rank output goes into a strided view of
y, never through a gather of the whole output or a dense ΔW:

    y.view(N, H, 3·dh)[:, :, 0:dh] += α/r · (x A_qᵀ) B_qᵀ .view(N, H, dh)      q of GPT-NeoX

A *part* is a named set of output rows (roles.Part): "q", "v", or FULL for every column; a
whole (unsliced) layer is the special case of the single part FULL. An adapter holds one
`LoraPart` (columns, rank, alpha) and one (A, B) pair per part it covers.

Everything a forward pass reads besides the weights (which adapters are active, whether adapters
are disabled, a per-call routing of several adapters) sits in one `AdapterState` that a LoraModel
shares with all its layers. The plain path below is what runs unless a call routes several
adapters at once; that case is one call into mixing.py.

What an adapter's low-rank path computes and how it folds into W is its variant's (lora_variant.py):
plain LoRA (plain_lora.py) unless a registered path replaces it (DoRA, dora.py), plus any
registered additions (lora_bias). This class knows none of them by name (variants.py lists them).

Shape legend for this file: N = tokens (batch × time, flattened), d_in / d_out = the base
layer's features, r = rank, d_part = the columns of one part.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import hotswap_forward
from . import renamed
from . import mixing
from . import named_init
from .quant import bnb_layers
from .adapter_layer import AdapterLayer, AdapterState
from .roles import FULL, Rows, by_part, features, part_of
from .variants import PLAIN, VARIANTS


@dataclass(frozen=True)
class LoraPart(Rows):
    """One (A, B) pair of an adapter: it writes output rows [first, end) of each of `blocks` equal
    blocks (one block: the columns [first, end)) at rank r, scaled by alpha / r (or alpha / sqrt(r)
    with rsLoRA)."""

    first: int  # first output column it writes (inside each block)
    end: int  # one past the last
    r: int  # rank: A is (r, d_in), B is (width, r), width = (end - first) · blocks
    alpha: float  # lora_alpha
    blocks: int = 1  # 1: contiguous; H: the same rows of each of H equal blocks (per head, per kv group)

    def scale(self, use_rslora: bool = False) -> float:
        return self.alpha / math.sqrt(self.r) if use_rslora else self.alpha / self.r


class LoraLinear(AdapterLayer):
    """A frozen base layer plus any number of named adapters, each over one or more output parts."""

    def __init__(self, base_layer: nn.Module, state: Optional[AdapterState] = None):
        super().__init__(base_layer, state)
        self.in_features, self.out_features = features(base_layer)
        # PEFT's layout for a whole-layer adapter: its one module under its name (lora_A.<adapter>.weight);
        # a sliced adapter, which PEFT cannot express, adds a level of parts (lora_A.<adapter>.<part>.weight)
        self.lora_A = nn.ModuleDict()  # adapter -> Linear(d_in, r), or {part -> Linear(d_in, r)}  weight (r, d_in)
        self.lora_B = nn.ModuleDict()  # adapter -> Linear(r, d_out), or {part -> Linear(r, d_part)}
        self.lora_dropout = nn.ModuleDict()  # adapter -> Dropout or Identity
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: adapter -> m (d_out,), or {part -> m}
        self.parts: dict[str, dict[str, LoraPart]] = {}  # adapter -> {part name -> columns, rank, alpha}
        self.scaling: dict[str, float | dict[str, float]] = {}  # adapter -> alpha / r, or {part name -> alpha / r}

    serves_hotswap = True  # hotswap.py can stack its adapters into slots
    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")  # PEFT's: the tables of trained modules
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")  # PEFT's: the other per-adapter tables

    @property
    def adapter_names(self) -> list[str]:
        return list(self.parts)

    # PEFT's per-adapter attributes: a number for a whole-layer adapter; for a sliced one (which PEFT
    # cannot express), a number per part
    @property
    def r(self) -> dict:
        return {name: _per_part({p: part.r for p, part in parts.items()}) for name, parts in self.parts.items()}

    @property
    def lora_alpha(self) -> dict:
        return {name: _per_part({p: part.alpha for p, part in parts.items()}) for name, parts in self.parts.items()}

    @property
    def use_dora(self) -> dict[str, bool]:
        return {name: name in self.lora_magnitude_vector for name in self.parts}

    # ------------------------------------------------------------------ one adapter's parts
    def pair(self, name: str, part: str) -> tuple[nn.Linear, nn.Linear]:
        """(A, B) of adapter `name` for `part`: A.weight (r, d_in), B.weight (d_part, r)."""
        return part_of(self.lora_A[name], part), part_of(self.lora_B[name], part)

    def part_scale(self, name: str, part: str) -> float:
        """alpha / r (alpha / √r with rsLoRA) of adapter `name`'s `part`."""
        scale = self.scaling[name]
        return scale[part] if isinstance(scale, dict) else scale

    def magnitude(self, name: str, part: str) -> nn.Module:
        """The DoRA magnitude m (d_part,) of adapter `name`'s `part`, as a module with `.weight`."""
        return part_of(self.lora_magnitude_vector[name], part)

    def adapter_dtype(self, name: str) -> torch.dtype:
        """The dtype adapter `name`'s weights are kept (and its low-rank path computes) in."""
        return self.pair(name, next(iter(self.parts[name])))[0].weight.dtype

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight` sees the base layer's, as in PEFT
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def fan_in_fan_out(self) -> bool:
        """True for GPT-2's Conv1D, which stores W as (d_in, d_out)."""
        return type(self.base_layer).__name__ == "Conv1D"

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        name: str,
        parts: dict[str, LoraPart],  # part name -> its columns, rank, alpha
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        dtype: Optional[torch.dtype] = None,
        **variant_options,  # registered variants' LoraConfig fields (use_dora=True, lora_bias=True): variants.py
    ) -> None:
        """Create adapter `name`: for each part, A (r, d_in) and B (d_part, r), B = 0."""
        self.check_variant_options(variant_options)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        if dtype is None:  # half-precision bases train fp32 adapters, as PEFT does
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        if not weight.is_floating_point():  # a quantized base stores codes, not values
            dtype = torch.float32
        A, B = {}, {}
        for part_name, part in parts.items():
            if part.blocks < 1 or self.out_features % part.blocks or not (
                    0 <= part.first < part.end <= self.out_features // part.blocks):
                raise ValueError(f"part {part_name!r} covers rows [{part.first}, {part.end}) of {part.blocks} block(s), "
                                 f"outside this layer's {self.out_features} output rows")
            if part.r <= 0:
                raise ValueError(f"rank r={part.r} for part {part_name!r}: a rank must be a positive integer")
            if part_name != FULL and part.r > part.width:
                raise ValueError(f"rank r={part.r} for part {part_name!r} exceeds the part's size ({part.width} rows): "
                                 f"a rank above {part.width} adds parameters and no expressiveness; lower r (or "
                                 "rank_pattern) for this layer")
            A[part_name] = nn.Linear(self.in_features, part.r, bias=False, device=weight.device, dtype=dtype)
            B[part_name] = nn.Linear(part.r, part.width, bias=False, device=weight.device, dtype=dtype)
        self.parts[name] = dict(parts)
        self.scaling[name] = _per_part({part_name: part.scale(use_rslora) for part_name, part in parts.items()})
        self.lora_A[name], self.lora_B[name] = by_part(A), by_part(B)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_adapter(name, init_lora_weights)
        for variant in VARIANTS:
            if variant_options.get(variant.field):
                variant.add(self, name, init_lora_weights)
        mixing.forget_stacks(self)  # mixed-batch stacks are out of date

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights=True) -> None:
        """A ~ kaiming-uniform(a=√5) (PEFT's default) or N(0, 1/r); B = 0 unless init is False.
        "pissa", "pissa_niter_K", "olora" and "orthogonal" are one call into named_init.py."""
        if named_init.is_named(init_lora_weights):
            return named_init.initialise(self, name, init_lora_weights)
        for part in self.parts[name]:
            A, B = self.pair(name, part)
            if init_lora_weights == "gaussian":
                nn.init.normal_(A.weight, std=1 / A.out_features)
            else:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            if init_lora_weights is False:  # a non-zero B: for tests that need the adapter to act
                nn.init.kaiming_uniform_(B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(B.weight)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of adapter `name` on this layer (A, B, and DoRA's m if it has one)."""
        return [p for table in (getattr(self, t) for t in self.adapter_layer_names)
                if name in table for p in table[name].parameters()]

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{part: (A (r, d_in), B (d_part, r))} of adapter `name`."""
        return {part: tuple(m.weight for m in self.pair(name, part)) for part in self.parts[name]}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for table in (*(getattr(self, t) for t in self.adapter_layer_names), self.lora_dropout):
            if name in table:
                del table[name]
        del self.parts[name], self.scaling[name]
        mixing.forget_stacks(self)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (..., d_out)
        state = self.state
        if state.disabled:
            return y
        if state.hotswap is not None:  # prepared for compiled hotswap: slots read from tensors (hotswap.py)
            return hotswap_forward.forward(self, y, x, state.hotswap, state.routing)
        if state.routing is not None:  # several adapters in this one call (adapter_names=, ...)
            if state.routing.mixture is not None:  # per-row adapters run variants on their own paths (mixing.py)
                self._refuse_variants_in_mixture(state.routing.mixture.adapters)
            return mixing.apply(self, y, x, state.routing)
        for name in state.active:
            if name in self.lora_A and name not in self.merged_adapters:
                y = self.add_lora(y, x, name)
        return y

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, name: str, weight: float = 1.0) -> torch.Tensor:
        """y (..., d_out) plus `weight` times adapter `name`'s change: its path's (plain LoRA's
        y[..., part] + s·(dropout(x) Aᵀ) Bᵀ, or DoRA's), then each addition's (lora_bias)."""
        for stage in self.stages(name):
            y = stage.forward(self, name, y, x, weight)
        return y

    def variants_of(self, name: str) -> list:
        """The registered variants (variants.py) adapter `name` uses; plain LoRA is not among them."""
        return [variant for variant in VARIANTS if variant.holds(self, name)]

    def stages(self, name: str) -> list:
        """What adapter `name` runs and folds, in order: its path (a registered variant that replaces
        plain LoRA, or PLAIN), then its additions."""
        variants = self.variants_of(name)
        path = next((v for v in variants if v.replaces_path), PLAIN)
        return [path, *(v for v in variants if not v.replaces_path)]

    def _refuse_variants_in_mixture(self, names) -> None:
        for name in (n for n in names if self.has_adapter(n)):
            used = [variant.label for variant in self.variants_of(name)]
            if used:
                raise ValueError(f"adapter {name!r} uses {', '.join(used)}, which a router's mixture of adapters does "
                                 "not support: route it with one adapter per row (adapter_names=) instead")

    # ------------------------------------------------------------------ merge
    def delta_weight(self, name: str, part: str) -> torch.Tensor:
        """(alpha/r) · B · A: (d_part, r) @ (r, d_in) -> (d_part, d_in), computed in fp32."""
        A, B = self.pair(name, part)
        return self.part_scale(name, part) * (B.weight.float() @ A.weight.float())

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """PEFT's name: adapter `name`'s ΔW over the whole layer, in the base weight's own layout
        ((d_out, d_in); (d_in, d_out) for Conv1D), fp32, zero in rows no part covers."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.base_layer.weight.device)
        for part_name, part in self.parts[name].items():
            rows = part.rows(delta, 0)  # (blocks, d_part / blocks, d_in), a view of delta
            rows.copy_(self.delta_weight(name, part_name).view(rows.shape))
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def _fold(self, name: str, sign: float) -> None:
        """The path folds into W (plain LoRA's ΔW, DoRA's rescaled rows), then each addition (lora_bias)."""
        for stage in self.stages(name):
            stage.fold(self, name, sign)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """W ← W + (alpha/r)·B·A for each adapter not merged yet. Merging twice is a no-op.
        `safe_merge`: first check that W + ΔW is finite; if not, raise ValueError and change nothing."""
        chosen = self.active_adapters if adapter_names is None else adapter_names  # [] merges nothing
        names = [n for n in chosen if n in self.lora_A and n not in self.merged_adapters]
        if names and self.state.hotswap is not None:
            raise ValueError("a model prepared for compiled hotswap keeps its adapters unmerged (every slot is served "
                             "from its stacks); merge a copy of the model that was not prepared")
        weight = self.base_layer.weight
        if names and not weight.is_floating_point() and not bnb_layers.is_bnb(weight):
            raise TypeError(
                "merge_adapter cannot fold an adapter into minilora's packed 4-bit weight in place; "
                "merge_and_unload() can (it dequantizes the base first, and requantize=True packs the result "
                "again), or keep the adapter unmerged"
            )
        for name in names:  # a variant that cannot fold (a bias without a base bias) refuses before anything changes
            for stage in self.stages(name):
                stage.check_fold(self, name)
        if names and bnb_layers.is_bnb(weight):
            bits = 4 if bnb_layers.is_bnb_4bit(weight) else 8
            warnings.warn(f"merging into a bitsandbytes {bits}-bit weight rounds the merged weight to {bits} bits "
                          "again: outputs differ from the unmerged model's by that rounding (as with PEFT)", stacklevel=3)
        if safe_merge:
            self.check_merge(names)
        for name in names:
            self._fold(name, +1.0)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ValueError, changing nothing, if W + ΔW would hold NaN or inf for one of these
        adapters. A 4-bit base is read dequantized, so a QLoRA model is checked before it is unpacked."""
        base = self.base_layer
        if base.weight.is_floating_point():
            W = base.weight.T if self.fan_in_fan_out else base.weight  # (d_out, d_in)
        elif bnb_layers.is_bnb(base.weight):
            W = bnb_layers.dequantize(base)  # (d_out, d_in)
        else:
            W = base.dequantized_weight(torch.float32)  # (d_out, d_in)
        for name in (n for n in adapter_names if n in self.lora_A and n not in self.merged_adapters):
            for part_name, part in self.parts[name].items():
                delta = self.delta_weight(name, part_name)  # (d_part, d_in)
                rows = part.rows(W, 0)  # (blocks, d_part / blocks, d_in)
                if not torch.isfinite(rows.float() + delta.view(rows.shape)).all():
                    raise ValueError(f"NaNs or infs detected in the merged weights: adapter {name!r} (part "
                                     f"{part_name!r}) seems to be broken; nothing was merged")

    def check_combinable(self, names: list[str], path: str) -> None:
        """Linear layers' pairs are what add_weighted_adapter combines (combine.py)."""

    # ------------------------------------------------------------------ files (PEFT's keys)
    def file_tensors(self, name: str, use_rslora: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
        """PEFT's one LoRA over the whole layer (`lora_A.weight` (r, d_in), `lora_B.weight` (d_out, r)),
        equal to this adapter's parts, and what its variants save (DoRA's `lora_magnitude_vector`)."""
        A, B, r, alpha = self._as_one_lora(name, use_rslora)
        tensors = {"lora_A.weight": A, "lora_B.weight": B}
        for variant in self.variants_of(name):
            tensors.update(variant.file_tensors(self, name, self._file_ratios(name)))
        return tensors, {"": (r, alpha)}

    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        self._from_one_lora(name, tensors["lora_A.weight"], tensors["lora_B.weight"], use_rslora, where)
        for variant in self.variants_of(name):
            variant.load_file_tensors(self, name, tensors, self._file_ratios(name), where)

    def _file_ratios(self, name: str) -> dict[str, float]:
        """Each part's scale over the scale of the one LoRA a file holds (the first part's)."""
        first = self.part_scale(name, next(iter(self.parts[name])))
        return {p: self.part_scale(name, p) / first for p in self.parts[name]}

    def sliced_parts(self, name: str) -> Optional[list[str]]:
        parts = list(self.parts[name])
        return None if parts == [FULL] else parts

    def _one_lora_scale(self, name: str, r_total: int, rslora: bool) -> tuple[float, float]:
        """(alpha, scale) of the single LoRA a file holds: the first part's scale, at rank r_total."""
        first_name, first = next(iter(self.parts[name].items()))
        scale = self.part_scale(name, first_name)
        alpha = first.alpha if r_total == first.r else (scale * math.sqrt(r_total) if rslora else scale * r_total)
        return alpha, scale

    def _as_one_lora(self, name: str, rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """One LoRA over the whole output, equal to the adapter's parts: (A, B, r, alpha). The parts'
        A stack into A (Σ r_p, d_in); B (d_out, Σ r_p) holds each part's B in its rows and its own
        r_p columns, zero elsewhere, rescaled to the first part's scale."""
        parts = self.parts[name]
        A_parts = [self.pair(name, p)[0].weight.detach() for p in parts]  # (r_p, d_in) each
        if list(parts) == [FULL]:
            return A_parts[0], self.pair(name, FULL)[1].weight.detach(), parts[FULL].r, parts[FULL].alpha
        A = torch.cat(A_parts)  # (Σ r_p, d_in)
        r_total = A.shape[0]
        alpha, scale = self._one_lora_scale(name, r_total, rslora)
        B = torch.zeros(self.out_features, r_total, dtype=A.dtype)  # (d_out, Σ r_p): zero outside the parts
        offset = 0
        for part_name, part in parts.items():
            ratio = self.part_scale(name, part_name) / scale  # 1.0 unless parts differ in scale
            rows = part.rows(B, 0)[..., offset:offset + part.r]  # (blocks, d_part / blocks, r_p), a view of B
            rows.copy_((self.pair(name, part_name)[1].weight.detach() * ratio).view(rows.shape))
            offset += part.r
        return A, B, r_total, alpha

    def _from_one_lora(self, name: str, A: torch.Tensor, B: torch.Tensor, rslora: bool, where: str) -> None:
        """The inverse of `_as_one_lora`: split one whole-layer LoRA back into the adapter's parts."""
        parts = self.parts[name]
        if list(parts) == [FULL]:
            self.set_factors(name, FULL, A, B)
            return
        _, scale = self._one_lora_scale(name, A.shape[0], rslora)
        covered = torch.zeros(B.shape, dtype=torch.bool)
        offset = 0
        for part_name, part in parts.items():
            cols = slice(offset, offset + part.r)
            B_part = part.rows(B, 0)[..., cols].reshape(part.width, part.r)  # (d_part, r_p)
            self.set_factors(name, part_name, A[cols], B_part * (scale / self.part_scale(name, part_name)))
            part.rows(covered, 0)[..., cols] = True
            offset += part.r
        if B[~covered].abs().max() > 0:
            raise ValueError(
                f"{where}: lora_B has non-zero entries outside the slices the config names (e.g. K's rows), so it "
                "cannot load as slices without changing the model; load it with target_modules set to the module name"
            )

    def extra_repr(self) -> str:
        ranks = {n: {p: part.r for p, part in parts.items()} for n, parts in self.parts.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters(rank per part)={ranks}"


def _per_part(values: dict):
    """One value for a whole-layer adapter (PEFT's shape), the dict of parts otherwise."""
    return values[FULL] if list(values) == [FULL] else values


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    return renamed.earlier_name(__name__, name, {'LoRALinear': 'LoraLinear'}, globals())
