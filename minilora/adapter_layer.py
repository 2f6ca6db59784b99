"""AdapterLayer: the contract every kind of adapter layer keeps, so that LoraModel and adapter_files.py never
ask which kind a layer is.

A kind wraps one frozen base module (`base_layer`) and holds any number of named adapters:

    lora.LoraLinear          nn.Linear, GPT-2's Conv1D, 4-bit linears (minilora's, bitsandbytes')
    embedding.LoraEmbedding  nn.Embedding
    experts.LoraExperts      mixture-of-experts weights stored as 3-D parameters

Each kind owns, for itself:

    add_adapter(name, parts, ...)        create adapter `name`; `parts` says what it adapts
    adapter_names, has_adapter(name)     which adapters it holds
    adapter_parameters(name)             what trains
    factors(name)                        its (A, B) weight tensors by unit; set_factors writes one pair
    delete_adapter(name)
    forward                              the base output plus the active adapters' updates
    merge / unmerge / check_merge        fold into the base weight and back: exact, idempotent
    file_tensors(name, use_rslora)       its tensors under PEFT's key suffixes, and (r, alpha) per unit
    load_file_tensors(name, tensors, use_rslora, where)     the inverse, every value checked
    sliced_parts(name), target_parameters(name)             what PEFT's config must name to read the file

and shares what the model shares: one `AdapterState` (which adapters act, disabled, this call's
routing), read in every forward pass, and PEFT's per-layer flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from . import mixing
from .variants import VARIANTS


@dataclass
class AdapterState:
    """What every adapter layer of a model reads in its forward pass, besides weights. A LoraModel
    owns one and hands the same object to each layer: a switch rewrites it once, not per layer."""

    active: list[str] = field(default_factory=list)  # adapters applied, in this order
    disabled: bool = False  # True inside LoraModel.disable_adapter(): the base model alone
    routing: Optional[mixing.Routing] = None  # this call's choice of several adapters, or None
    hotswap: Optional[Any] = None  # hotswap.Hotswap once prepared for compiled hotswap: slots and stacks


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus named adapters (see the module docstring for what a kind provides)."""

    def __init__(self, base_layer: nn.Module, state: Optional[AdapterState] = None):
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []
        self.state = state if state is not None else AdapterState()

    # ------------------------------------------------------------------ which adapters
    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_names

    # PEFT's per-layer flags; here views of the model's one AdapterState
    @property
    def active_adapters(self) -> list[str]:
        return self.state.active

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self.state.active[:] = names  # in place: the state is shared with the rest of the model

    @property
    def disable_adapters(self) -> bool:
        """True while the model's adapters are switched off (PEFT's per-layer flag; here one for all layers)."""
        return self.state.disabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @staticmethod
    def check_variant_options(options: dict) -> None:
        """TypeError for an add_adapter option no registered variant (variants.py) answers to."""
        unknown = sorted(set(options) - {v.field for v in VARIANTS})
        if unknown:
            raise TypeError(f"add_adapter got unknown options {unknown}")

    def refuse_variants(self, options: dict, kind: str) -> None:
        """Variants (variants.py: use_dora, lora_bias) extend linear layers; another kind refuses any it
        is asked for, and a misspelt option, by name."""
        self.check_variant_options(options)
        used = sorted(option for option, value in options.items() if value)
        if used:
            raise ValueError(f"{', '.join(used)} is not available on {kind} in minilora; leave the {kind} out of "
                             f"target_modules or turn {', '.join(used)} off")

    # ------------------------------------------------------------------ the low-rank factors
    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter `name`'s (A, B) weight tensors by unit: a part's name (FULL for a whole layer), or
        "<parameter>.<part>" for expert weights. Shapes are the kind's (lora.py: A (r, d_in), B (d_part, r))."""
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """What trains in adapter `name`: its factors, unless a kind holds more."""
        return [t for pair in self.factors(name).values() for t in pair]

    @torch.no_grad()
    def set_factors(self, name: str, unit: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy A and B into adapter `name`'s pair `unit` (a key of `factors(name)`), shapes checked."""
        A_to, B_to = self.factors(name)[unit]
        if A.shape != A_to.shape or B.shape != B_to.shape:
            raise ValueError(f"adapter {name!r}, {unit}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit its "
                             f"A {tuple(A_to.shape)} and B {tuple(B_to.shape)}")
        A_to.copy_(A)
        B_to.copy_(B)

    # ------------------------------------------------------------------ forward, for additive kinds
    def add_deltas(self, y: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
        """y (the base's output) plus `self.delta(x, name)` of each active, unmerged adapter, or what
        this call's routing chose: a weighted sum (adapter_weights=) or one adapter per batch row
        (adapter_names=). For kinds whose update is an output added to the base's (embeddings,
        convolutions); `kind` names them in the refusal of a learned router."""
        state = self.state
        if state.disabled:
            return y
        routing = state.routing
        if routing is not None and routing.weights is not None:
            for name, w in routing.weights.items():
                if self.has_adapter(name):
                    y = y + w * self.delta(x, name).to(y.dtype)
            return y
        if routing is not None and routing.rows is not None:
            out = y.clone()
            for name in dict.fromkeys(routing.rows):
                if name == mixing.BASE or not self.has_adapter(name):
                    continue
                index = torch.tensor([i for i, n in enumerate(routing.rows) if n == name], device=x.device)
                out[index] = out[index] + self.delta(x[index], name).to(y.dtype)
            return out
        if routing is not None:
            raise ValueError(f"a learned router (mixture) cannot route {kind} adapter; target linear layers only")
        for name in state.active:
            if self.has_adapter(name) and name not in self.merged_adapters:
                y = y + self.delta(x, name).to(y.dtype)
        return y

    # ------------------------------------------------------------------ merge
    def _fold(self, name: str, sign: float) -> None:
        """W ← W + sign · ΔW of adapter `name` (sign −1 takes a merge back out)."""
        raise NotImplementedError

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ValueError, changing nothing, if merging one of these adapters would give NaN or inf."""
        raise NotImplementedError

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold each chosen adapter not merged yet into the base (the active ones by default).
        Merging twice is a no-op. `safe_merge`: check_merge first, so a refusal changes nothing."""
        chosen = self.state.active if adapter_names is None else adapter_names
        names = [n for n in chosen if self.has_adapter(n) and n not in self.merged_adapters]
        if safe_merge:
            self.check_merge(names)
        for name in names:
            self._fold(name, +1.0)
            self.merged_adapters.append(name)

    def unmerge(self, adapter_names: Optional[list[str]] = None) -> None:
        """W ← W − ΔW for merged adapters, latest first. Unmerging twice is a no-op."""
        for name in reversed(list(self.merged_adapters)):
            if adapter_names is None or name in adapter_names:
                self._fold(name, -1.0)
                self.merged_adapters.remove(name)

    def check_combinable(self, names: list[str], path: str) -> None:
        """add_weighted_adapter combines the pairs of linear layers; other kinds refuse here."""
        if any(self.has_adapter(n) for n in names):
            raise ValueError(f"{path} holds an embedding or expert-weights adapter, which add_weighted_adapter "
                             "cannot combine yet; combine adapters that target linear layers only")

    # ------------------------------------------------------------------ files (PEFT's keys)
    def file_tensors(self, name: str, use_rslora: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
        """({key suffix after `<module path>.`: tensor}, {unit: (r, alpha) as exported}); the unit is
        "" for the layer itself, or the name of one of its parameters."""
        raise NotImplementedError

    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        """Copy a file's tensors (keyed as `file_tensors` gives them, shapes already checked) into
        adapter `name`; ValueError naming `where` if they cannot be expressed by its parts."""
        raise NotImplementedError

    def sliced_parts(self, name: str) -> Optional[list[str]]:
        """The parts of a fused layer that adapter `name` covers, or None when it covers the whole layer."""
        return None

    def target_parameters(self, name: str) -> list[str]:
        """The base parameters (PEFT's target_parameters) adapter `name` adapts in place of modules."""
        return []

    def accepts_saved_table(self, table: torch.Tensor, where: str) -> bool:
        """True if the whole base table PEFT saves beside some adapters (`<path>.base_layer.weight`)
        belongs in this layer's base; other kinds ignore it, as PEFT does."""
        return False
