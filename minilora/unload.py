"""Taking the adapters out of a model: folded in (merge_and_unload) or dropped (unload).

A 4-bit (QLoRA) base is dequantized before the merge, so the merged weight is W_hat + (α/r)·B·A
in full precision, exact with respect to the dequantized base; `requantize` packs those layers
into NF4 again and measures what that costs: the relative error ‖Q(W') − W'‖ / ‖W'‖ per layer,
which each re-packed layer keeps (`requantization_error`) and `requantization_report(merged)` sums up.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
import torch.nn as nn

from .adapter_layer import AdapterLayer
from .modules_to_save import ModulesToSave
from .quant import Linear4bit, NF4Config
from .roles import set_submodule


def strip_adapters(model: nn.Module, keep_copies: bool) -> nn.Module:
    """`model` with every adapter layer replaced by its base layer, and every trained copy by the
    active copy (`keep_copies`) or the original; nothing trains. Merging, if any, happened before."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            set_submodule(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            set_submodule(model, name, module.active_module if keep_copies else module.original_module)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dequantize_bases(layers: dict[str, nn.Module]) -> dict[str, NF4Config]:
    """Give each adapter layer over a minilora 4-bit base a dense base instead; {path: its NF4Config}."""
    quantized = {}
    for name, module in layers.items():
        if isinstance(module.base_layer, Linear4bit):
            quantized[name] = module.base_layer.config
            module.base_layer = module.base_layer.to_float()
    return quantized


def requantize_layers(merged: nn.Module, quantized: dict[str, NF4Config], setting: Union[bool, NF4Config]) -> None:
    """Pack the merged layers at `quantized`'s paths into NF4 again (with `setting` if it is an
    NF4Config, else each layer's own); each new layer keeps its relative error."""
    for name, config in quantized.items():
        dense = merged.get_submodule(name)
        layer = Linear4bit.from_float(dense, setting if isinstance(setting, NF4Config) else config)
        W = dense.weight.detach().float()
        W = W.t() if layer.from_conv1d else W  # (out, in)
        layer.requantization_error = ((layer.dequantized_weight(torch.float32) - W).norm() / W.norm()).item()
        set_submodule(merged, name, layer)


def requantization_report(model: nn.Module) -> dict:
    """What `merge_and_unload(requantize=...)` cost the returned model: {"requantized_layers",
    "relative_error": {path: ‖Q(W') − W'‖ / ‖W'‖}, "max_relative_error", "mean_relative_error"}."""
    errors = {name: m.requantization_error for name, m in model.named_modules()
              if isinstance(m, Linear4bit) and getattr(m, "requantization_error", None) is not None}
    if not errors:
        raise ValueError("no layer of this model was packed again by merge_and_unload(requantize=...): pass the model "
                         "that call returned")
    return {"requantized_layers": len(errors), "relative_error": errors, "max_relative_error": max(errors.values()),
            "mean_relative_error": sum(errors.values()) / len(errors)}


class MergeAndUnload:
    """LoraModel's merging, PEFT's calls: merge_adapter, unmerge_adapter, merge_and_unload, unload.
    A mixin of LoraModel (model.py), which gives it `model`, `active_adapters`, `_check_exists`
    and `_lora_layers`."""

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                      progressbar: bool = False) -> None:
        """Fold the (active, or named) adapters into the base weights. Idempotent: merging an adapter
        already merged warns and does nothing. `safe_merge`: check the merged weights are finite
        before writing them, and raise ValueError (nothing changed) if not. `progressbar`: a bar
        over the layers."""
        names = adapter_names or self.active_adapters
        self._check_exists(names)
        layers = self._lora_layers().values()
        already = sorted({n for layer in layers for n in layer.merged_adapters if n in names})
        if already:
            warnings.warn(f"adapters {already} are already merged; merging them again does nothing", stacklevel=2)
        if safe_merge:  # every layer checked before any changes: all or nothing
            self._check_merge(names)
        if progressbar:
            from tqdm.auto import tqdm
            layers = tqdm(layers, desc="merging", unit="layer", leave=False)
        for layer in layers:
            layer.merge([n for n in names if layer.has_adapter(n)])

    def _check_merge(self, names: list[str]) -> None:
        for layer in self._lora_layers().values():
            layer.check_merge([n for n in names if layer.has_adapter(n)])

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights. Idempotent."""
        for layer in self._lora_layers().values():
            layer.unmerge()

    def _unload(self, merge: bool, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                progressbar: bool = False) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge, progressbar=progressbar)
        else:
            self.unmerge_adapter()
        return strip_adapters(self.model, keep_copies=merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None,
                         requantize: Union[bool, NF4Config] = False) -> nn.Module:
        """The plain HF model with the adapters folded in (and the trained head copies in place).

        A 4-bit (QLoRA) base is dequantized first, so the result is W_hat + (α/r)·B·A in full
        precision, exact with respect to the dequantized base. With `requantize` (True, or an
        NF4Config) those layers are quantized again, and `requantization_report(merged)` says what
        that cost: the relative error ‖Q(W') − W'‖ / ‖W'‖ per layer."""
        if safe_merge:  # before a 4-bit base is unpacked: a refusal leaves the model as it was
            names = adapter_names or self.active_adapters
            self._check_exists(names)
            self._check_merge(names)
        quantized = dequantize_bases(self._lora_layers())
        merged = self._unload(merge=True, adapter_names=adapter_names, progressbar=progressbar)  # checked above
        if requantize and quantized:
            requantize_layers(merged, quantized, requantize)
            self._requantized = merged  # for the earlier `merge_report` below
        return merged

    @property
    def merge_report(self) -> dict:
        """The earlier way to read `requantization_report(merged)`, kept for one release."""
        warnings.warn("LoraModel.merge_report is now minilora.requantization_report(merged), read from the model "
                      "merge_and_unload returned; the attribute goes in the next release", FutureWarning, stacklevel=2)
        if getattr(self, "_requantized", None) is None:
            raise AttributeError("merge_report: merge_and_unload(requantize=...) has not packed any layer again")
        return requantization_report(self._requantized)

    def unload(self) -> nn.Module:
        """The plain HF model as it was before any adapter: LoRA removed, nothing merged."""
        return self._unload(merge=False)

