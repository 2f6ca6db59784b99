r"""Plain LoRA: the path an adapter of a LoraLinear takes unless a variant replaces it (lora_variant.py).

For each part p of the adapter (its output rows, roles.Part), with s_p = alpha_p / r_p:

    y[..., p] += s_p · (dropout(x) A_pᵀ) B_pᵀ          A_p (r_p, d_in), B_p (d_part, r_p)
    W[p]      += s_p · B_p A_p                          merge (fold +1); unmerge subtracts it (−1)

The forward pass adds the low-rank product into the parts' columns of y (LowRankAdd, with its
backward written out); the dense ΔW exists only while merging. A bitsandbytes 4- or 8-bit base
is dequantized, changed and quantized again, as PEFT does.

Shapes: N = tokens (batch × time, flattened), d_in / d_out = the base layer's features, r = rank,
d_part = the rows of one part.
"""

from __future__ import annotations

import torch

from .lora_variant import LoraVariant
from .quant import bnb_layers
from .roles import part_rows


class PlainLora(LoraVariant):
    label = "plain LoRA"
    replaces_path = True

    def add(self, layer, name: str, init_lora_weights) -> None:
        """A and B are every adapter's (LoraLinear.add_adapter): nothing more to add."""

    def holds(self, layer, name: str) -> bool:
        return not any(v.replaces_path for v in layer.variants_of(name))

    def forward(self, layer, name: str, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        """y[..., part] + weight · s_p · (dropout(x) A_pᵀ) B_pᵀ for each part of adapter `name`."""
        x = layer.lora_dropout[name](x.to(layer.adapter_dtype(name)))  # (..., d_in)
        columns, scales, factors = [], [], []
        for part_name, part in layer.parts[name].items():
            A, B = layer.pair(name, part_name)
            h = A(x).reshape(-1, part.r)  # (N, d_in) @ (d_in, r) -> (N, r)
            columns.append((part.first, part.end, part.blocks))
            scales.append(weight * layer.part_scale(name, part_name))
            factors += [h.to(y.dtype), B.weight.to(y.dtype)]  # h (N, r), B (d_part, r)
        y2d = y.reshape(-1, layer.out_features)  # (N, d_out)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (y2d, *factors)):
            return LowRankAdd.apply(y2d, tuple(columns), tuple(scales), *factors).view(y.shape)
        return low_rank_add(y2d, columns, scales, factors).view(y.shape)  # no gradient: no Function needed

    @torch.no_grad()
    def fold(self, layer, name: str, sign: float) -> None:
        """W[p] ← W[p] + sign · s_p · B_p A_p for each part, in the base weight's own dtype."""
        if bnb_layers.is_bnb(layer.base_layer.weight):  # bitsandbytes' 4 or 8 bits: dequantize, add, requantize
            W = bnb_layers.dequantize(layer.base_layer)  # (d_out, d_in) fp32
            for part_name, part in layer.parts[name].items():
                rows = part.rows(W, 0)  # (blocks, d_part / blocks, d_in), a view of W
                rows += sign * layer.delta_weight(name, part_name).view(rows.shape)
            return bnb_layers.requantize(layer.base_layer, W)
        weight = layer.base_layer.weight  # (d_out, d_in), or (d_in, d_out) for Conv1D
        W = weight.T if layer.fan_in_fan_out else weight  # (d_out, d_in), a view: writes reach the weight
        for part_name, part in layer.parts[name].items():
            delta = sign * layer.delta_weight(name, part_name)  # (d_part, d_in)
            if part.blocks == 1:
                W[part.first:part.end] = (W[part.first:part.end].float() + delta).to(W.dtype)
            else:  # only the part's rows of each block: a strided view of W, written in place
                rows = part.rows(W, 0)  # (blocks, d_part / blocks, d_in)
                rows.copy_((rows.float() + delta.view(rows.shape)).to(W.dtype))


def low_rank_add(y: torch.Tensor, columns, scales, factors) -> torch.Tensor:
    """out[:, first:end] = y[:, first:end] + s_p · h_p B_pᵀ for each part p; y itself is not changed.
    columns: (first, end, blocks) per part; factors: h_1 (N, r_1), B_1 (d_1, r_1), h_2, B_2, ...
    A part of several blocks (per head, per kv group) adds through a strided view of its rows."""
    with torch.autocast(y.device.type, enabled=False):  # the caller already chose the dtype
        if len(columns) == 1 and tuple(columns[0]) == (0, y.shape[1], 1):
            h, B = factors
            return torch.addmm(y, h, B.t(), alpha=scales[0])  # y + s·h Bᵀ in one GEMM
        out = y.clone()
        for (first, end, blocks), scale, h, B in zip(columns, scales, factors[0::2], factors[1::2]):
            if blocks == 1:
                out[:, first:end].addmm_(h, B.t(), alpha=scale)  # (N, r) @ (r, d_part)
            else:  # e.g. q of [q_h k_h v_h]: out.view(N, H, 3dh)[:, :, 0:dh] += (h Bᵀ).view(N, H, dh)
                rows = part_rows(out, first, end, blocks)  # (N, blocks, d_part / blocks), a view of out
                rows.add_((h @ B.t()).view(rows.shape), alpha=scale)  # (N, r) @ (r, d_part)
        return out


class LowRankAdd(torch.autograd.Function):
    r"""out = y, plus s_p · h_p B_pᵀ added into the columns of each part p; the backward written out.

    Forward, per part p with columns [first, end):   (N, r) @ (r, d_part) -> (N, d_part)
        out[:, first:end] = y[:, first:end] + s_p · h_p B_pᵀ

    Backward, with G = dL/dout (N, d_out) and G_p = G[:, first:end]:
        dL/dy   = G                        the add is the identity on y: no copy, no zeros
        dL/dh_p = s_p · G_p B_p            (N, d_part) @ (d_part, r) -> (N, r)
        dL/dB_p = s_p · G_pᵀ h_p           (d_part, N) @ (N, r) -> (d_part, r)
    and autograd carries dL/dh_p on through h_p = x A_pᵀ to A_p and x.

    Written by hand because the generic route (in-place adds on column views of y) makes autograd
    copy the whole of G once per part in the backward pass; here the only copy is one clone of y
    in the forward pass, and none at all when a single part covers every column (one fused GEMM).
    """

    @staticmethod
    def forward(ctx, y, columns, scales, *factors):  # y (N, d_out); factors: h_1, B_1, h_2, B_2, ...
        out = low_rank_add(y, columns, scales, factors)
        ctx.save_for_backward(*factors)
        ctx.columns, ctx.scales = columns, scales
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N, d_out)
        factors = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]  # one flag per factor, after y, columns and scales
        grads = []
        for (first, end, blocks), scale, h, B, want_h, want_B in zip(
            ctx.columns, ctx.scales, factors[0::2], factors[1::2], wanted[0::2], wanted[1::2]
        ):
            G = part_rows(grad_out, first, end, blocks).reshape(len(grad_out), -1)  # (N, d_part): the part's only
            grads.append((G @ B).mul_(scale) if want_h else None)  # (N, r)
            grads.append((G.t() @ h).mul_(scale) if want_B else None)  # (d_part, r)
        return (grad_out, None, None, *grads)
