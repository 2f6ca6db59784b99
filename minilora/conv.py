r"""LoraConv: a frozen nn.Conv1d / nn.Conv2d / nn.Conv3d plus low-rank adapters (PEFT's Conv layers).

A convolution's weight W is (C_out, C_in, *k). LoRA factors it through r channels, as PEFT does:

    A: a convolution C_in -> r with the base's kernel k, stride and padding   A.weight (r, C_in, *k)
    B: a 1×…×1 convolution r -> C_out                                          B.weight (C_out, r, 1, …)

    y  = conv(x, W) + b + s · B(A(dropout(x)))                 s = alpha / r (alpha / √r with rsLoRA)
    W' = W + s · (B ⊗ A),   (B ⊗ A)[o, i, …] = Σ_j B[o, j] · A[j, i, …]

B is 1×…×1, so B(A(x)) is exactly conv(x, B ⊗ A): merging is exact. B starts at zero. Dilation,
grouped convolutions and padding modes other than zeros are refused (PEFT's A ignores the first
and cannot merge the second).

Shape legend: C_in / C_out = channels, k = kernel size, r = rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from . import renamed
from .adapter_layer import AdapterLayer, AdapterState
from .roles import FULL, Site, layer_index, walk

CONV = "conv"  # the role of a convolution site: targeted by module name only, never by "all-linear"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_sites(model: nn.Module, layers_pattern=None, modules=None) -> dict[str, Site]:
    """A Site for every convolution (or LoraConv) in `model`, keyed by module path. `modules`: the
    pairs of one `walk(model)`, when the caller has walked it already."""
    return {name: Site(name, CONV, None, m.out_channels, layer_index(name, layers_pattern), None, None)
            for name, m in (walk(model) if modules is None else modules) if isinstance(m, (*CONV_TYPES, LoraConv))}


class LoraConv(AdapterLayer):
    """A frozen convolution plus any number of named adapters, one (A, B) pair each."""

    adapter_layer_names = ("lora_A", "lora_B")  # PEFT's: the tables of trained modules
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")  # PEFT's: the other per-adapter tables
    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module, state: Optional[AdapterState] = None):
        super().__init__(base_layer, state)
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels
        self.in_features, self.out_features = self.in_channels, self.out_channels  # PEFT's names
        self.lora_A = nn.ModuleDict()  # adapter -> ConvNd(C_in, r, k)      weight (r, C_in, *k)
        self.lora_B = nn.ModuleDict()  # adapter -> ConvNd(r, C_out, 1…1)   weight (C_out, r, 1, …)
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # PEFT's DoRA table: empty, DoRA is not available here
        self.scaling: dict[str, float] = {}  # adapter -> alpha / r
        self.ranks: dict[str, tuple[int, float]] = {}  # adapter -> (r, alpha)

    r = property(lambda self: {name: r for name, (r, _) in self.ranks.items()})  # PEFT's layer.r[name]
    lora_alpha = property(lambda self: {name: alpha for name, (_, alpha) in self.ranks.items()})
    use_dora = property(lambda self: {name: False for name in self.ranks})

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ranks)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, parts: dict, lora_dropout: float = 0.0, init_lora_weights=True,
                    use_rslora: bool = False, **variant_options) -> None:
        """Create adapter `name`: A like the base kernel, B 1×…×1 and zero."""
        self.refuse_variants(variant_options, "convolutions")
        base = self.base_layer
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError("convolutions take plain LoRA (init_lora_weights True, False or 'gaussian'); "
                             "leave the convolution out of target_modules or drop those options")
        if list(parts) != [FULL]:
            raise ValueError("a convolution has no slices: target it by its module name")
        if base.groups != 1 or any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
            raise ValueError(f"{type(base).__name__} with groups={base.groups}, dilation={base.dilation}, "
                             f"padding_mode={base.padding_mode!r}: LoRA covers ungrouped, undilated, zero-padded "
                             "convolutions only; leave this one out of target_modules")
        part = parts[FULL]
        if part.r <= 0:
            raise ValueError(f"rank r={part.r}: a rank must be a positive integer")
        conv, dims = type(base), base.weight.dim() - 2
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        kwargs = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A[name] = conv(self.in_channels, part.r, base.kernel_size, base.stride, base.padding, **kwargs)
        self.lora_B[name] = conv(part.r, self.out_channels, (1,) * dims, (1,) * dims, **kwargs)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = part.scale(use_rslora)
        self.ranks[name] = (part.r, part.alpha)
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights=True) -> None:
        """A ~ kaiming-uniform(a=√5) or N(0, 1/r); B = 0 unless init is False (as lora.py)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{FULL: (A (r, C_in, *k), B (C_out, r, 1, …))} of adapter `name`."""
        return {FULL: (self.lora_A[name].weight, self.lora_B[name].weight)}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name], self.ranks[name]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.add_deltas(self.base_layer(x, *args, **kwargs), x, "a convolution")  # (batch, C_out, *spatial)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B(A(dropout(x))): (batch, C_in, *spatial) -> (batch, r, *) -> (batch, C_out, *spatial)."""
        A = self.lora_A[name]
        return self.lora_B[name](A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """s · (B ⊗ A): (C_out, r) @ (r, C_in · Πk) -> (C_out, C_in, *k), in fp32."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.scaling[name] * (B.flatten(1) @ A.flatten(1)).view(self.base_layer.weight.shape)

    @torch.no_grad()
    def _fold(self, name: str, sign: float) -> None:
        W = self.base_layer.weight
        W.copy_((W.float() + sign * self.get_delta_weight(name)).to(W.dtype))

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ValueError, changing nothing, if merging one of these adapters would give NaN or inf."""
        W = self.base_layer.weight.float()
        for name in (n for n in adapter_names if self.has_adapter(n) and n not in self.merged_adapters):
            if not torch.isfinite(W + self.get_delta_weight(name)).all():
                raise ValueError(f"NaNs or infs detected in the merged weights: adapter {name!r} seems to be "
                                 "broken; nothing was merged")

    # ------------------------------------------------------------------ files (PEFT's keys)
    def file_tensors(self, name: str, use_rslora: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
        return ({"lora_A.weight": self.lora_A[name].weight.detach(), "lora_B.weight": self.lora_B[name].weight.detach()},
                {"": self.ranks[name]})

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        self.set_factors(name, FULL, tensors["lora_A.weight"], tensors["lora_B.weight"])

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, adapters(rank, alpha)={self.ranks}"


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    return renamed.earlier_name(__name__, name, {'LoRAConv': 'LoraConv'}, globals())
