r"""LoraExperts: LoRA per expert on mixture-of-experts weights stored as 3-D parameters.

transformers keeps a sparse layer's experts in one module with one parameter per projection,
stacked over experts: Mixtral's `experts.gate_up_proj` is (E, 2·d_ff, d) and `experts.down_proj`
(E, d, d_ff); GPT-OSS stores them transposed, (E, d, 2·d_ff), with gate and up interleaved. Each
expert e gets its own pair, on its own rows:

    W'_e = W_e + (alpha / r) · B_e · A_e         A_e ∈ R^{r × d_in},  B_e ∈ R^{d_part × r}

stored as A (E, r, d_in) and B (E, d_part, r). A part is a set of rows of every expert's output,
as in lora.py: "gate" and "up" of `gate_up_proj` ([gate | up], or [g_0 u_0 g_1 u_1 ...]), or
FULL; the role names gate / up / down select them.

The experts' own forward pass (a loop over routed experts, or transformers' grouped matmul)
reads the parameters, so the adapted weight is handed to it for the call:
`torch.func.functional_call(experts, {"gate_up_proj": W + ΔW})`. The update is per expert and
dense over that expert's part (E · d_part · d_in values, once per forward), as in PEFT's
parameter targets; activations never pass through a second path, so lora_dropout is refused.
An expert no token is routed to reads its slice of W + ΔW nowhere, so its A_e and B_e get no
gradient; the router (`mlp.gate`) is a plain module, trained only if named in modules_to_save.

Shape legend: E = experts, d_in / d_out = one expert's features, r = rank, d_part = a part's rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from . import renamed, routed
from .adapter_layer import AdapterLayer, AdapterState
from .lora import LoraPart
from .roles import FULL


class LoraExperts(AdapterLayer):
    """A frozen experts module plus, per adapter and per targeted 3-D parameter, one (A, B) pair
    per part, each holding every expert's factors."""

    HOLDS_EXPERT_WEIGHTS = True  # roles.classify: not a Linear site; its 3-D parameters are sites

    def __init__(self, base_layer: nn.Module, state: Optional[AdapterState] = None):
        super().__init__(base_layer, state)
        self.transposed = bool(getattr(base_layer, "is_transposed", False))  # stored (E, d_in, d_out)
        self.lora_A = nn.ModuleDict()  # adapter -> {parameter -> {part -> A (E, r, d_in)}}
        self.lora_B = nn.ModuleDict()  # adapter -> {parameter -> {part -> B (E, d_part, r)}}
        self.parts: dict[str, dict[str, dict[str, LoraPart]]] = {}  # adapter -> parameter -> part -> rows, r, alpha
        self.scaling: dict[str, dict[str, dict[str, float]]] = {}  # adapter -> parameter -> part -> alpha / r
        self.fan_in_fan_out = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.parts)

    def weight_of(self, parameter: str) -> torch.Tensor:
        """The base parameter as (E, d_out, d_in), a view."""
        W = getattr(self.base_layer, parameter)
        return W.transpose(1, 2) if self.transposed else W

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, parameters: dict[str, dict[str, LoraPart]], lora_dropout: float = 0.0,
                    init_lora_weights=True, use_rslora: bool = False, **variant_options) -> None:
        """Create adapter `name` on `parameters` ({parameter -> {part -> LoraPart}}); B = 0."""
        if lora_dropout:
            raise ValueError(f"lora_dropout={lora_dropout} on expert weights: the update is added to the weight, "
                             "not run on activations, so there is no input to drop; set lora_dropout=0")
        self.refuse_variants(variant_options, "expert weights")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError("expert weights take plain LoRA only (init_lora_weights True, False or 'gaussian'); "
                             "leave the experts out of this adapter or drop those options")
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        A, B = nn.ModuleDict(), nn.ModuleDict()
        for parameter, parts in parameters.items():
            W = self.weight_of(parameter)
            experts, d_out, d_in = W.shape
            dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
            A[parameter], B[parameter] = nn.ParameterDict(), nn.ParameterDict()
            for part_name, part in parts.items():
                if d_out % part.blocks or not 0 <= part.first < part.end <= d_out // part.blocks:
                    raise ValueError(f"{parameter}: part {part_name!r} lies outside its {d_out} output rows")
                if part_name != FULL and part.r > part.width:
                    raise ValueError(f"rank r={part.r} for part {part_name!r} of {parameter} exceeds the part's size "
                                     f"({part.width} rows); lower r for this layer")
                A[parameter][part_name] = nn.Parameter(torch.empty(experts, part.r, d_in, dtype=dtype, device=W.device))
                B[parameter][part_name] = nn.Parameter(torch.zeros(experts, part.width, part.r, dtype=dtype,
                                                                   device=W.device))
        self.lora_A[name], self.lora_B[name] = A, B
        self.parts[name] = {p: dict(parts) for p, parts in parameters.items()}
        self.scaling[name] = {p: {n: part.scale(use_rslora) for n, part in parts.items()} for p, parts in parameters.items()}
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights=True) -> None:
        """Each expert's A as lora.py's (kaiming-uniform, or N(0, 1/r)); B = 0 unless init is False."""
        for parameter, factors in self.lora_A[name].items():
            for part_name, A in factors.items():
                B = self.lora_B[name][parameter][part_name]
                for e in range(A.shape[0]):
                    if init_lora_weights == "gaussian":
                        nn.init.normal_(A[e], std=1 / A.shape[1])
                    else:
                        nn.init.kaiming_uniform_(A[e], a=5 ** 0.5)
                    if init_lora_weights is False:
                        nn.init.kaiming_uniform_(B[e], a=5 ** 0.5)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for table in (self.lora_A, self.lora_B) if name in table for p in table[name].parameters()]

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"<parameter>.<part>": (A (E, r, d_in), B (E, d_part, r))} of adapter `name`."""
        return {f"{parameter}.{part}": (A, self.lora_B[name][parameter][part])
                for parameter, parts in self.lora_A[name].items() for part, A in parts.items()}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.lora_A[name], self.lora_B[name], self.parts[name], self.scaling[name]

    # ------------------------------------------------------------------ forward
    def delta_weight(self, name: str, parameter: str, part: str) -> torch.Tensor:
        """(alpha/r) · B_e · A_e for every expert: (E, d_part, r) @ (E, r, d_in) -> (E, d_part, d_in)."""
        A, B = self.lora_A[name][parameter][part], self.lora_B[name][parameter][part]
        return self.scaling[name][parameter][part] * torch.bmm(B, A)

    def adapted_weight(self, parameter: str, names: list[str]) -> torch.Tensor:
        """The parameter as the experts read it, W + ΔW of adapters `names`, in its stored layout."""
        W = self.weight_of(parameter)  # (E, d_out, d_in)
        out = W.clone()
        for name in names:
            for part_name, part in self.parts[name].get(parameter, {}).items():
                rows = part.rows(out, 1)  # (E, blocks, d_part / blocks, d_in), a view of out
                rows += self.delta_weight(name, parameter, part_name).to(W.dtype).view(rows.shape)
        return out.transpose(1, 2) if self.transposed else out

    def forward(self, *args, **kwargs):
        state = self.state
        if state.routing is not None:
            raise ValueError("mixed batches (adapter_names=) and adapter mixtures do not reach expert weights; "
                             "run each adapter's rows in a call of their own after set_adapter")
        names = [] if state.disabled else [n for n in state.active if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        if routed.understands(self.base_layer):  # the low-rank terms on the routed tokens only (routed.py)
            return routed.experts_forward(self, names, *routed.routing_arguments(args, kwargs))
        return self.dense_delta_forward(names, *args, **kwargs)

    def dense_delta_forward(self, names: list[str], *args, **kwargs):
        """The experts' own forward on W + ΔW, ΔW formed for every expert (PEFT's way; for experts
        modules `routed.py` does not understand)."""
        targeted = dict.fromkeys(p for n in names for p in self.parts[n])
        weights = {p: self.adapted_weight(p, names) for p in targeted}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def _fold(self, name: str, sign: float) -> None:
        for parameter, parts in self.parts[name].items():
            W = self.weight_of(parameter)  # (E, d_out, d_in), a view: writes reach the parameter
            for part_name, part in parts.items():
                rows = part.rows(W, 1)  # (E, blocks, d_part / blocks, d_in)
                rows += (sign * self.delta_weight(name, parameter, part_name)).to(W.dtype).view(rows.shape)

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ValueError, changing nothing, if merging one of these adapters would give NaN or inf."""
        for name in (n for n in adapter_names if n in self.lora_A and n not in self.merged_adapters):
            for parameter in self.parts[name]:
                if not torch.isfinite(self.adapted_weight(parameter, [name])).all():
                    raise ValueError(f"NaNs or infs detected in the merged weights: adapter {name!r} ({parameter}) "
                                     "seems to be broken; nothing was merged")

    # ------------------------------------------------------------------ files (PEFT's keys)
    def file_tensors(self, name: str, use_rslora: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
        """Per targeted parameter, PEFT's one LoRA per expert (see `_as_peft_factors`)."""
        tensors, ranks = {}, {}
        for parameter, key in self._peft_keys(name).items():
            A, B, r, alpha = self._as_peft_factors(name, parameter, use_rslora)
            tensors[f"{key}lora_A.weight"], tensors[f"{key}lora_B.weight"] = A, B
            ranks[parameter] = (r, alpha)
        return tensors, ranks

    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        for parameter, key in self._peft_keys(name).items():
            self._from_peft_factors(name, parameter, tensors[f"{key}lora_A.weight"], tensors[f"{key}lora_B.weight"],
                                    f"{where}.{parameter}")

    def target_parameters(self, name: str) -> list[str]:
        return list(self.parts[name])

    def _peft_keys(self, name: str) -> dict[str, str]:
        """Parameter -> the key prefix PEFT gives its factors, after `<module path>.`. PEFT wraps one
        parameter per wrapper and nests them in the module's parameter order, the first innermost:
        with gate_up_proj and down_proj targeted, `base_layer.lora_A.weight` is gate_up_proj's and
        `lora_A.weight` down_proj's."""
        order = [p for p, _ in self.base_layer.named_parameters(recurse=False) if p in self.parts[name]]
        return {p: "base_layer." * (len(order) - 1 - i) for i, p in enumerate(order)}

    def _as_peft_factors(self, name: str, parameter: str, rslora: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """One LoRA per expert over the whole parameter, in PEFT's layout: (A, B, r, alpha) with
        A (E·R, d_in), row e·R + j, and B (d_out, R·E), column j·E + e; R = Σ r_p, B zero outside the parts."""
        parts, scales = self.parts[name][parameter], self.scaling[name][parameter]
        A = torch.cat([self.lora_A[name][parameter][p].detach() for p in parts], dim=1)  # (E, R, d_in)
        experts, r_total, d_in = A.shape
        first_name, first = next(iter(parts.items()))
        scale = scales[first_name]
        alpha = first.alpha if r_total == first.r else (scale * math.sqrt(r_total) if rslora else scale * r_total)
        B = torch.zeros(experts, self.weight_of(parameter).shape[1], r_total, dtype=A.dtype)  # (E, d_out, R)
        offset = 0
        for part_name, part in parts.items():
            rows = part.rows(B, 1)[..., offset:offset + part.r]  # (E, blocks, d_part / blocks, r_p), a view of B
            B_part = self.lora_B[name][parameter][part_name].detach() * (scales[part_name] / scale)  # (E, d_part, r_p)
            rows.copy_(B_part.view(rows.shape))
            offset += part.r
        return A.reshape(experts * r_total, d_in), B.permute(1, 2, 0).reshape(B.shape[1], r_total * experts), r_total, alpha

    def _from_peft_factors(self, name: str, parameter: str, A: torch.Tensor, B: torch.Tensor, where: str) -> None:
        """The inverse of `_as_peft_factors`: PEFT's per-expert A and B back into the parameter's parts."""
        parts, scales = self.parts[name][parameter], self.scaling[name][parameter]
        experts = self.weight_of(parameter).shape[0]
        r_total = A.shape[0] // experts
        A = A.reshape(experts, r_total, -1)  # (E, R, d_in)
        B = B.reshape(B.shape[0], r_total, experts).permute(2, 0, 1)  # (E, d_out, R)
        scale = next(iter(scales.values()))  # the export kept the first part's scale (see _as_peft_factors)
        covered = torch.zeros(B.shape, dtype=torch.bool)
        offset = 0
        for part_name, part in parts.items():
            cols = slice(offset, offset + part.r)
            B_part = part.rows(B, 1)[..., cols].reshape(experts, part.width, part.r)  # (E, d_part, r_p)
            self.set_factors(name, f"{parameter}.{part_name}", A[:, cols], B_part * (scale / scales[part_name]))
            part.rows(covered, 1)[..., cols] = True
            offset += part.r
        if (B[~covered] != 0).any():
            raise ValueError(f"{where}: lora_B has non-zero entries outside the parts the config names (e.g. up's "
                             "rows), so it cannot load as parts without changing the model; load it with "
                             "target_parameters")

    def extra_repr(self) -> str:
        ranks = {n: {p: {k: v.r for k, v in parts.items()} for p, parts in params.items()} for n, params in self.parts.items()}
        return f"experts, adapters(rank per parameter part)={ranks}"


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    return renamed.earlier_name(__name__, name, {'LoRAExperts': 'LoraExperts'}, globals())
