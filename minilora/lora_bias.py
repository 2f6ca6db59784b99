r"""lora_bias: a trained bias on the LoRA path (PEFT's `lora_bias=True`), a variant of LoraLinear.

    y = x Wᵀ + b + s · ((dropout(x) Aᵀ) Bᵀ + b_B)          b_B ∈ R^{d_part}, one per part, starts at 0

It is B's own bias (`lora_B.<adapter>.bias`, PEFT's key), scaled with the rest of the update by
s = alpha / r. Merging folds it into the base bias, b ← b + s · b_B on the part's rows, so a base
layer without a bias cannot merge (PEFT's rule: a warning when the adapter is added, an error when
merging). Mixed batches (adapter_names=) and routers stack plain (A, B) pairs, so they refuse it;
a weighted mix (adapter_weights=) scales it with the rest of each adapter's path.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from .lora_variant import LoraVariant

KEY = "lora_B.bias"  # its key after `<module path>.` in PEFT's files


class LoraBias(LoraVariant):
    field = label = "lora_bias"  # an addition: it adds to whichever path runs

    def add(self, layer, name: str, init_lora_weights) -> None:
        for path in (v for v in layer.variants_of(name) if v.replaces_path):  # PEFT's rule too
            raise ValueError(f"lora_bias with {path.label} is not supported; drop one of the two")
        if layer.base_layer.bias is None:
            warnings.warn(f"lora_bias=True on a {type(layer.base_layer).__name__} without a bias: the adapter trains "
                          "its bias, but merging it will not be possible (as in PEFT)", stacklevel=5)
        for part in layer.parts[name]:
            B = layer.pair(name, part)[1]
            bias = torch.zeros(B.out_features, dtype=B.weight.dtype, device=B.weight.device)
            if init_lora_weights is False:  # an acting adapter for tests: nn.Linear's own bias init
                nn.init.uniform_(bias, -1 / math.sqrt(B.in_features), 1 / math.sqrt(B.in_features))
            B.bias = nn.Parameter(bias)  # (d_part,)

    def holds(self, layer, name: str) -> bool:
        return layer.pair(name, next(iter(layer.parts[name])))[1].bias is not None

    def forward(self, layer, name: str, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        """y + weight · s · b_B in each part's rows: one add over y (..., d_out)."""
        return y + (weight * self._dense(layer, name)).to(y.dtype)

    def _dense(self, layer, name: str) -> torch.Tensor:
        """Σ_p s_p · b_B,p placed in its part's rows: (d_out,), zero elsewhere."""
        full = torch.zeros(layer.out_features, device=layer.base_layer.weight.device)
        for part_name, part in layer.parts[name].items():
            rows = part.rows(full)  # (blocks, d_part / blocks), a view of full
            bias = layer.pair(name, part_name)[1].bias
            rows.copy_((layer.part_scale(name, part_name) * bias.float()).view(rows.shape))
        return full

    @torch.no_grad()
    def check_fold(self, layer, name: str) -> None:
        bias = layer.base_layer.bias
        if bias is None:
            raise RuntimeError(f"adapter {name!r} trains a bias (lora_bias=True) but the base layer has none, so it "
                               "cannot be merged; keep it unmerged")
        if not torch.isfinite(bias.float() + self._dense(layer, name)).all():
            raise ValueError(f"NaNs or infs detected in the merged bias: adapter {name!r} seems to be broken; "
                             "nothing was merged")

    @torch.no_grad()
    def fold(self, layer, name: str, sign: float) -> None:
        """b ← b + sign · s·b_B; LoraLinear.merge ran check_fold for every adapter before any fold."""
        bias = layer.base_layer.bias
        bias.copy_((bias.float() + sign * self._dense(layer, name)).to(bias.dtype))

    def file_tensors(self, layer, name: str, ratio: dict[str, float]) -> dict[str, torch.Tensor]:
        """PEFT's one LoRA over the whole layer has one `lora_B.bias` (d_out,): each part's bias in its
        rows, rescaled as its B is (`ratio`), zero in rows no part covers."""
        full = torch.zeros(layer.out_features, dtype=layer.adapter_dtype(name))
        for part_name, part in layer.parts[name].items():
            rows = part.rows(full)
            rows.copy_((layer.pair(name, part_name)[1].bias.detach() * ratio[part_name]).view(rows.shape))
        return {KEY: full}

    @torch.no_grad()
    def load_file_tensors(self, layer, name: str, tensors: dict[str, torch.Tensor], ratio: dict[str, float],
                          where: str) -> None:
        full, covered = tensors[KEY], torch.zeros(layer.out_features, dtype=torch.bool)
        for part_name, part in layer.parts[name].items():
            layer.pair(name, part_name)[1].bias.copy_(part.rows(full).flatten() / ratio[part_name])
            part.rows(covered).fill_(True)
        if (full[~covered] != 0).any():
            raise ValueError(f"{where}: lora_B.bias has non-zero entries outside the slices the config names (e.g. K's "
                             "rows), so it cannot load as slices; load it with target_modules set to the module name")
