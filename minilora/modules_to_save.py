"""modules_to_save (PEFT's): modules trained in full, each adapter with its own copy.

The original module stays frozen at `<path>.original_module`; adapter `a` trains the copy at
`<path>.modules_to_save.a`, which is what runs while `a` is the first active adapter that has one
(with adapter_names=, each row's adapter's copy runs on that row).
The copy has storage of its own, so a head tied to the input embeddings is untied (with a
warning) and the embeddings stay frozen. PEFT's file keys: `<path>.<parameter>` of the copy.

Which modules: surgery.plan_adapter resolves the names (and the task heads PEFT adds) to paths;
`wrap_modules_to_save` applies them.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from . import mixing
from .adapter_layer import AdapterState
from .roles import set_submodule


class ModulesToSave(nn.Module):
    """A module trained in full: the original stays frozen, each adapter trains its own copy."""

    def __init__(self, module: nn.Module, state: AdapterState):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()  # adapter -> trainable copy
        self.state = state  # the first active adapter with a copy is used

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)  # own storage: untied

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters that have a copy here (at most one: LoraModel.set_adapter sees to it)."""
        return [n for n in self.state.active if n in self.modules_to_save]

    @property
    def active_module(self) -> nn.Module:
        active = next((n for n in self.state.active if n in self.modules_to_save), None)
        if self.state.disabled or active is None:
            return self.original_module
        return self.modules_to_save[active]

    @property
    def weight(self):  # code that reads `lm_head.weight` sees the module in use
        return self.active_module.weight

    def forward(self, x, *args, **kwargs):
        routing = self.state.routing
        if routing is not None and routing.rows is not None and not self.state.disabled:
            return self._per_row(routing, x, *args, **kwargs)
        return self.active_module(x, *args, **kwargs)

    def _per_row(self, routing, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """adapter_names=: row b through adapter rows[b]'s copy (the original for "__base__" or an adapter
        without one), out of place, so each row's loss reaches its own copy only. x (B, ...)."""
        segments, inverse = mixing.rows_by_adapter(routing, x.device)
        pieces = [self.modules_to_save[name](x[rows], *args, **kwargs) if name in self.modules_to_save
                  else self.original_module(x[rows], *args, **kwargs) for name, rows in segments]
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (B, ...), the rows grouped by adapter
        return out if inverse is None else out[inverse]

    def has_adapter(self, name: str) -> bool:
        return name in self.modules_to_save

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    # what adapter_files.py asks of every module an adapter saves (see adapter_layer.AdapterLayer)
    def file_tensors(self, name: str, use_rslora: bool) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter's trained copy, under PEFT's `<path>.<parameter>` keys."""
        return {param: value.detach() for param, value in self.modules_to_save[name].state_dict().items()}, {}

    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        copy_ = self.modules_to_save[name]
        copy_.load_state_dict({p: tensors[p] for p in copy_.state_dict()})

    def sliced_parts(self, name: str) -> None:
        return None

    def target_parameters(self, name: str) -> list[str]:
        return []

    def accepts_saved_table(self, table: torch.Tensor, where: str) -> bool:
        return False


def wrap_modules_to_save(model: nn.Module, paths: list[str], adapter_name: str,
                         state: AdapterState) -> list[ModulesToSave]:
    """Give `adapter_name` a trainable copy of the module at each of `paths`; the wrappers."""
    embedding = model.get_input_embeddings() if paths and hasattr(model, "get_input_embeddings") else None
    tied_to = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    wrappers = []
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            if any(id(p) in tied_to for p in module.parameters()):
                warnings.warn(f"{path} shares its weight with the input embeddings; its trainable copy is "
                              "untied so the embeddings stay frozen", stacklevel=4)
            module = ModulesToSave(module, state)
            set_submodule(model, path, module)
        if adapter_name in module.modules_to_save:
            raise ValueError(f"{path} already has a copy for adapter {adapter_name!r}")
        module.add(adapter_name)
        wrappers.append(module)
    return wrappers
