r"""The forward pass of a linear layer whose model is prepared for compiled hotswap (hotswap.py):
the rows run the slot the shared index tensor names, or one slot each (a mixed batch).

    y[..., part] += (x A_stack[slot]ᵀ) B_stack[slot]ᵀ       (N, d_in) @ (d_in, R) @ (R, d_part)

A_stack (S + 1, R, d_in) and B_stack (S + 1, d_part, R) are the layer's buffers hotswap_A<i> and
hotswap_B<i>, one pair per set of rows (`layer.hotswap_rows`); the scale is folded into B_stack.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import mixing
from .plain_lora import low_rank_add


def forward(layer, y: torch.Tensor, x: torch.Tensor, hot, routing: Optional[mixing.Routing]) -> torch.Tensor:
    """y (..., d_out) plus the low-rank product of the slot each row runs: `hot.slot` for all rows,
    or `routing.slots` (B,) one per row."""
    if layer.merged:
        raise ValueError("adapters are merged into the weights of a model prepared for hotswap; unmerge_adapter() first")
    dtype = getattr(layer, "hotswap_A0").dtype
    if routing is not None:
        batch = x.shape[0]
        if routing.slots.shape[0] != batch:
            raise ValueError(f"adapter_names has {routing.slots.shape[0]} entries but this layer sees a batch of {batch} "
                             "rows; give one name per row (row-expanding generation is not supported with adapter_names)")
        x3 = x.reshape(batch, -1, layer.in_features).to(dtype)  # (B, T, d_in)
        y3 = y.reshape(batch, -1, layer.out_features)  # (B, T, d_out), added to in place (eval mode)
        for i, rows in enumerate(layer.hotswap_rows):
            mixing.add_gathered(y3, x3, getattr(layer, f"hotswap_A{i}"), getattr(layer, f"hotswap_B{i}"),
                                routing.slots, rows)
        return y3.view(y.shape)
    x2 = x.reshape(-1, layer.in_features).to(dtype)  # (N, d_in)
    columns, factors = [], []
    for i, rows in enumerate(layer.hotswap_rows):
        A = getattr(layer, f"hotswap_A{i}").index_select(0, hot.slot)[0]  # (R, d_in)
        B = getattr(layer, f"hotswap_B{i}").index_select(0, hot.slot)[0]  # (d_part, R), the scale folded in
        columns.append((rows.first, rows.end, rows.blocks))
        factors += [(x2 @ A.t()).to(y.dtype), B.to(y.dtype)]  # (N, R), (d_part, R)
    out = low_rank_add(y.reshape(-1, layer.out_features), columns, [1.0] * len(columns), factors)  # (N, d_out)
    return out.view(y.shape)
