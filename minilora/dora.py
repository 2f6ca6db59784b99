r"""DoRA (Liu et al., 2024): a LoRA adapter that learns the length of each weight row on its own.

DoRA splits the adapted weight into a direction and a magnitude. With W the frozen base weight
(d_out, d_in), s·B·A the low-rank update and ‖·‖_c the norm of each output row:

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c          m ∈ R^{d_out}, trainable, one value per row

m starts at ‖W‖_c (measured with the adapter's initial B, which is zero), so a fresh DoRA
adapter changes nothing. Writing g = m / ‖W + s·B·A‖_c (d_out,) and x for the layer's input,

    y' = x W'ᵀ + b = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b
       = y + (g − 1) ⊙ (y − b) + g ⊙ s·(x Aᵀ) Bᵀ          y = x Wᵀ + b, the base layer's output

The last line is what runs: the base output is reused, W is never multiplied again, and at
init g is exactly 1 (same norm of the same W, computed the same way) and B = 0, so the added
term is exactly zero and the output equals the base's bit for bit.

Which term is detached. ‖W + s·B·A‖_c depends on A and B; the paper (section 4.3) treats it as
a constant in the backward pass. Its gradient would need the dense (d_out, d_in) update kept for
the backward pass of every layer; without it, gradients reach A and B through the low-rank path
only, and m through g = m / ‖·‖_c, at the memory cost of plain LoRA. PEFT does the same.

Several active adapters: y is the layer's output so far, so a DoRA adapter applied after another
adapter scales that one's change too, as PEFT does. adapter_weights={name: w} adds w times the
change: y + w·((g − 1) ⊙ (y − b) + g ⊙ s·(x Aᵀ) Bᵀ).

Dropout (lora_dropout) applies to the low-rank path's input only, as in plain LoRA; the base
output y is the undropped one. (PEFT, when training with dropout, also feeds the dropped input
through W; with lora_dropout = 0 or in eval mode the two agree.)

Slices of a fused layer. On GPT-2's `c_attn` an adapter on the q and v parts has one m per part,
over that part's rows only: each slice's rows are normalised on their own and K's columns are
untouched. PEFT has no slices, but every norm here is one output row's, so rows never mix: the
whole-layer file (adapter_files.py) carries m for the parts' rows and ‖W_row‖ for the others (K's), where
B's rows are zero, so PEFT computes g = ‖W_row‖ / ‖W_row‖ = 1 there and the same function as the
slices (`whole_magnitude`, `set_whole_magnitude`). The key is PEFT's,
`base_model.model.<path>.lora_magnitude_vector`, both ways.

Merging writes W' = g ⊙ (W + s·B·A) into the rows of each part and keeps the rows as they were
(and as written), so unmerging restores W exactly. Mixed batches (adapter_names=) are refused:
they stack every adapter's (A, B) into one batched product, which has no place for g.

DoRA is a path of LoraLinear (lora_variant.py): class `Dora` below calls these functions at the
protocol's points, and LoraLinear knows nothing else of it.

Quantized bases (Linear4bit): the norm is taken over the dequantized weight, in fp32.

Shapes: N = tokens, d_in / d_out = the base layer's features, d_part = the rows of one part.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .lora_variant import LoraVariant
from .quant import bnb_layers
from .roles import by_part

MAGNITUDE = "lora_magnitude_vector"  # the attribute of LoraLinear, and PEFT's name in files


class Dora(LoraVariant):
    """DoRA as a path of LoraLinear (lora_variant.py): the functions below, at the protocol's points."""

    field = "use_dora"
    label = "DoRA (use_dora=True)"
    replaces_path = True

    def add(self, layer, name: str, init_lora_weights) -> None:
        add_magnitudes(layer, name)

    def holds(self, layer, name: str) -> bool:
        return name in layer.lora_magnitude_vector

    def forward(self, layer, name: str, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        return add_dora(layer, y, x, name, weight)

    def check_fold(self, layer, name: str) -> None:
        if bnb_layers.is_bnb(layer.base_layer.weight):
            bits = 4 if bnb_layers.is_bnb_4bit(layer.base_layer.weight) else 8
            raise TypeError(f"merging a DoRA adapter into a bitsandbytes {bits}-bit weight is not supported; "
                            "keep the adapter unmerged, or load the base in bf16 to merge")

    def fold(self, layer, name: str, sign: float) -> None:
        fold(layer, name, sign)

    def file_tensors(self, layer, name: str, ratio: dict[str, float]) -> dict[str, torch.Tensor]:
        return {MAGNITUDE: whole_magnitude(layer, name)}  # m over every row: the scale does not enter it

    def load_file_tensors(self, layer, name: str, tensors: dict[str, torch.Tensor], ratio: dict[str, float],
                          where: str) -> None:
        set_whole_magnitude(layer, name, tensors[MAGNITUDE], where)


class Magnitude(nn.Module):
    """m for one part of a DoRA adapter: `weight` (d_part,). While merged, `merged` holds the rows
    (d_part, d_in) as they were before the merge and as the merge wrote them."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm)
        self.merged: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def dense_weight(layer) -> torch.Tensor:
    """The base weight as (d_out, d_in), in fp32: dequantized for a 4-bit base, transposed for Conv1D."""
    base = layer.base_layer
    if hasattr(base, "dequantized_weight"):  # Linear4bit
        return base.dequantized_weight(torch.float32)
    W = base.weight.detach().float()
    return W.t() if layer.fan_in_fan_out else W


@torch.no_grad()
def row_norm(layer, name: str, part: str) -> torch.Tensor:
    """‖W_p + s·B·A‖ per row of `part` (d_part,), fp32, no gradient, without forming W + s·B·A:

        ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ

    ‖W_i‖² is cached (W is frozen), A Wᵀ is the base layer applied to the rows of A (r products of
    a vector with W, through whatever computes the base: a Linear, a Conv1D, an NF4 kernel), and
    the rest is r × r. The dense (d_part, d_in) update never exists in the forward pass."""
    p = layer.parts[name][part]
    A_module, B_module = layer.pair(name, part)
    A = A_module.weight.detach().float()  # (r, d_in)
    B = B_module.weight.detach().float()  # (d_part, r)
    s = layer.part_scale(name, part)
    base, bias = layer.base_layer, getattr(layer.base_layer, "bias", None)
    AW = base(A.to(_input_dtype(layer))).float()  # (r, d_in) -> (r, d_out): A Wᵀ (+ b)
    if bias is not None:
        AW = AW - bias.detach().float()
    cross = (B * p.rows(AW).flatten(1).t()).sum(1)  # (d_part,)
    square = ((B @ (A @ A.t())) * B).sum(1)  # (d_part, r) ⊙ (d_part, r) -> (d_part,)
    norms = p.rows(_weight_row_norms(layer)).flatten()  # ‖W_i‖; with B = 0, √(‖W_i‖²) gives it back exactly
    return (norms * norms + 2 * s * cross + s * s * square).clamp_min(0).sqrt()


def _input_dtype(layer) -> torch.dtype:
    weight = layer.base_layer.weight
    return weight.dtype if weight.is_floating_point() else torch.float32  # NF4: codes, computes in fp32


def _weight_row_norms(layer) -> torch.Tensor:
    """‖W_row‖ (d_out,), fp32, cached on the layer until its base weight changes (a merge, a load)."""
    if torch.compiler.is_compiling():  # a graph holds no Python-side cache: ‖W_row‖ computed in it
        return torch.linalg.vector_norm(dense_weight(layer), dim=1)
    weight = layer.base_layer.weight
    key = (weight.data_ptr(), weight._version, weight.device)
    cached = layer.__dict__.get("_dora_row_norms")
    if cached is None or cached[0] != key:
        cached = (key, torch.linalg.vector_norm(dense_weight(layer), dim=1))
        layer.__dict__["_dora_row_norms"] = cached
    return cached[1]


def add_magnitudes(layer, name: str) -> None:
    """Make adapter `name` of `layer` a DoRA adapter: one m per part, m = ‖W_p + s·B·A‖ (‖W_p‖ when B = 0)."""
    dtype = layer.adapter_dtype(name)
    layer.lora_magnitude_vector[name] = by_part(
        {part: Magnitude(row_norm(layer, name, part).to(dtype)) for part in layer.parts[name]})


@torch.no_grad()
def whole_magnitude(layer, name: str) -> torch.Tensor:
    """m over every output row (d_out,), as PEFT's whole-layer file holds it: the parts' m, and
    ‖W_row‖ for rows no part covers (their update is zero, so their gain is 1)."""
    m = _weight_row_norms(layer).clone()  # (d_out,)
    for part_name, part in layer.parts[name].items():
        rows = part.rows(m)  # (blocks, d_part / blocks), a view of m
        rows.copy_(layer.magnitude(name, part_name).weight.float().view(rows.shape))
    return m.to(layer.adapter_dtype(name))


@torch.no_grad()
def set_whole_magnitude(layer, name: str, m: torch.Tensor, where: str) -> None:
    """The inverse of `whole_magnitude`: the parts' rows of m (d_out,) into each part's m. Rows no
    part covers must hold ‖W_row‖ (gain 1): a file whose other rows were trained cannot load as slices."""
    covered = torch.zeros(m.shape[0], dtype=torch.bool)
    for part_name, part in layer.parts[name].items():
        layer.magnitude(name, part_name).weight.copy_(part.rows(m).flatten())
        part.rows(covered).fill_(True)
    base = _weight_row_norms(layer)
    if not torch.allclose(m[~covered].float(), base[~covered], rtol=1e-5, atol=1e-7):
        raise ValueError(f"{where}: lora_magnitude_vector rescales rows outside the slices the config names (e.g. "
                         "K's), so it cannot load as slices without changing the model; load it with "
                         "target_modules set to the module name")


def add_dora(layer, y: torch.Tensor, x: torch.Tensor, name: str, weight: float = 1.0) -> torch.Tensor:
    """y + w · ((g − 1) ⊙ (y − b) + g ⊙ s·(dropout(x) Aᵀ) Bᵀ) in the rows of each part of adapter
    `name`, g = m / ‖W + s·B·A‖ (detached), w = `weight`. y (..., d_out) is the output so far.

    Per output row the change is affine in y, so it runs as one pass over y and one matmul:

        y' = c ⊙ y + β + H B'ᵀ        c = 1 + w(g − 1),  β = −w(g − 1) ⊙ b,  B' = (w·s·g) ⊙ B

    with c = 1, β = 0 and B' = 0 on rows no part covers, H = [dropout(x) A_pᵀ]_p (N, Σr) and B'
    (d_out, Σr) holding each part's rows of (w·s·g) ⊙ B_p in its own r columns. The vectors and B'
    are small; the (N, d_out) activations are read once and written once, in forward and backward."""
    x = layer.lora_dropout[name](x.to(layer.adapter_dtype(name)))  # (..., d_in)
    bias = layer.base_layer.bias
    y2d = y.reshape(-1, layer.out_features)  # (N, d_out)
    parts = layer.parts[name]
    gain = y2d.new_ones(layer.out_features, dtype=torch.float32)  # c (d_out,)
    shift = torch.zeros_like(gain)  # β (d_out,)
    B_scaled = y2d.new_zeros(layer.out_features, sum(p.r for p in parts.values()), dtype=torch.float32)  # B'
    H, column = [], 0
    for part_name, part in parts.items():
        A, B = layer.pair(name, part_name)
        g = layer.magnitude(name, part_name).weight.float() / row_norm(layer, name, part_name)  # (d_part,)
        rows = part.rows(gain)  # (blocks, d_part / blocks), a view
        rows.copy_((1 + weight * (g - 1)).view(rows.shape))
        if bias is not None:
            rows = part.rows(shift)
            rows.copy_((-weight * (g - 1) * part.rows(bias).flatten().float()).view(rows.shape))
        scaled = (weight * layer.part_scale(name, part_name) * g)[:, None] * B.weight.float()  # (d_part, r)
        rows = part.rows(B_scaled[:, column:column + part.r], 0)  # (blocks, d_part / blocks, r), a view
        rows.copy_(scaled.view(rows.shape))
        H.append(A(x).reshape(-1, part.r))  # (N, d_in) @ (d_in, r) -> (N, r)
        column += part.r
    dtype = y.dtype
    out = torch.addcmul(shift.to(dtype), y2d, gain.to(dtype))  # c ⊙ y + β  (N, d_out)
    out = torch.addmm(out, torch.cat(H, 1).to(dtype), B_scaled.t().to(dtype))  # + (N, Σr) @ (Σr, d_out)
    return out.view(y.shape)


@torch.no_grad()
def fold(layer, name: str, sign: float) -> None:
    """sign +1: W_p ← g ⊙ (W_p + s·B·A) for each part, the old rows kept; sign −1: put them back
    (plus whatever was merged into those rows since, so a later merge is not lost)."""
    W = layer.base_layer.weight  # (d_out, d_in), or (d_in, d_out) for Conv1D
    for part_name, part in layer.parts[name].items():
        rows = part.rows(W.T if layer.fan_in_fan_out else W, 0)  # (blocks, d_part / blocks, d_in) view
        magnitude = layer.magnitude(name, part_name)
        if sign > 0:
            updated = rows.float().flatten(0, 1) + layer.delta_weight(name, part_name)  # (d_part, d_in)
            g = magnitude.weight.float() / torch.linalg.vector_norm(updated, dim=1)  # (d_part,)
            before = rows.clone()
            rows.copy_((g[:, None] * updated).to(W.dtype).view(rows.shape))
            magnitude.merged = (before, rows.clone())
        else:
            before, written = magnitude.merged
            rows.copy_(before if torch.equal(rows, written) else before + (rows - written))
            magnitude.merged = None
