"""LoraModel: a Hugging Face model with named LoRA adapters, and PEFT's API around it.

    model = get_peft_model(hf_model, LoraConfig(...))      # wraps in place, freezes the base
    model(**batch); model.generate(...)                    # the HF model's own forward / generate
    model.add_adapter("legal", cfg); model.set_adapter("legal")
    with model.disable_adapter(): ...                      # exactly the base model
    model.merge_adapter(); model.unmerge_adapter()         # fold (alpha/r)·B·A into W and back
    base = model.merge_and_unload()                        # a plain HF model again

Attributes the wrapper doesn't have are looked up on the HF model (`model.config`, ...).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from .config import LoraConfig
from .io import load_adapter, save_adapters
from . import mixing
from .combine import add_weighted_adapter
from .lora import LoRALinear
from .params import count_parameters, format_trainable, parameter_breakdown
from .quant import Linear4bit, NF4Config
from .surgery import (
    TASK_HEADS,
    ModulesToSave,
    _set_submodule,
    adapter_layers,
    has_module,
    inject_adapter,
    mark_trainable,
    wrap_modules_to_save,
)


class LoraModel(nn.Module):
    """A HF model whose target layers carry LoRA adapters. `self.model` is the HF model."""

    def __init__(self, model: nn.Module, config: Optional[LoraConfig], adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = []  # shared with every adapter layer: mutated in place, never rebound
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its parameters (for set_adapter)
        self.mixed_batch_method = "gather"  # adapter_names: "gather" (batched matmuls) or "segments"
        if config is not None:  # None: adapters come later, from files (`from_pretrained`)
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ passthrough
    def forward(self, *args, adapter_names: Optional[list[str]] = None,
                adapter_weights: Optional[dict[str, float]] = None, **kwargs):
        """The HF model's forward. `adapter_names`: one adapter (or "__base__") per batch row, in
        eval mode. `adapter_weights`: {adapter: weight}, the weighted sum of their low-rank paths."""
        with self._routing(adapter_names, adapter_weights, args, kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None,
                 adapter_weights: Optional[dict[str, float]] = None, **kwargs):
        """The HF model's generate, with the same per-row / weighted adapter choice as forward."""
        with self._routing(adapter_names, adapter_weights, args, kwargs):
            return self.model.generate(*args, **kwargs)

    def _routing(self, adapter_names, adapter_weights, args, kwargs):
        if adapter_names is None and adapter_weights is None:
            return contextlib.nullcontext()
        if adapter_names is not None and adapter_weights is not None:
            raise ValueError("give adapter_names (one adapter per row) or adapter_weights (a mix), not both")
        if any(layer.merged for layer in self._lora_layers()):
            raise RuntimeError("adapters are merged into the weights; call unmerge_adapter() before choosing adapters per call")
        chosen = list(adapter_names) if adapter_names is not None else list(adapter_weights)
        unknown = sorted({n for n in chosen if n != mixing.BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)} (and '__base__')")
        if adapter_weights is not None:
            bad = {n: w for n, w in adapter_weights.items() if not isinstance(w, (int, float)) or w != w}
            if bad:
                raise ValueError(f"adapter_weights must map adapter names to numbers, got {bad}")
            return mixing.routed(mixing.Routing(weights={n: float(w) for n, w in adapter_weights.items() if n != mixing.BASE}))
        if self.training:
            raise RuntimeError("mixed batches (adapter_names) run in eval mode: call model.eval() first")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.shape[0] != len(chosen):
            raise ValueError(f"adapter_names has {len(chosen)} entries but the batch has {ids.shape[0]} rows: give one per row")
        return mixing.routed(mixing.Routing(rows=tuple(chosen), method=self.mixed_batch_method))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> "LoraModel":
        """PEFT's `peft_model.base_model.model` path reaches the HF model here too."""
        return self

    def get_base_model(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active[0] if self._active else None

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add an adapter (not active until `set_adapter`); targets are resolved on this model."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first or pick "
                f"another name (existing: {sorted(self.peft_config)})"
            )
        config = copy.deepcopy(config)
        heads = [h for h in TASK_HEADS.get(config.task_type, ()) if has_module(self.model, h)]
        if heads:  # as PEFT does: a task head trains along with the adapter
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(heads))
        paths = inject_adapter(self.model, config, adapter_name)
        wrappers = wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        if len(self.peft_config) == 1 or config.bias != "none":
            self._apply_active()  # the first adapter freezes the base; biases are shared by all
            return
        # only the new adapter's layers need linking: the cost does not grow with the adapters loaded
        self._params[adapter_name] = []
        for layer in [self.model.get_submodule(p) for p in paths] + wrappers:
            layer.active_adapters = self._active
            tables = (layer.lora_A, layer.lora_B) if isinstance(layer, LoRALinear) else (layer.modules_to_save,)
            for table in tables:
                self._params[adapter_name].extend(table[adapter_name].parameters())
        trainable = adapter_name in self._active and not config.inference_mode
        for p in self._params[adapter_name]:
            p.requires_grad_(trainable)

    def _check_exists(self, names: list[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; available adapters: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make these adapters the active (and trainable) ones; the others stay but sleep.

        Every adapter layer holds the same list of active names, so a switch rewrites one list and
        flips requires_grad on the adapters going out and coming in: its cost does not grow with
        the number of adapters loaded."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_exists(names)
        outgoing = [n for n in self._active if n not in names]
        biases = {self.peft_config[n].bias for n in names + self._active}
        self._active[:] = names  # in place: the list every layer reads
        if biases != {"none"}:  # trainable biases belong to no single adapter: recompute everything
            self._apply_active()
            return
        for name in outgoing:
            for p in self._params[name]:
                p.requires_grad_(False)
        for name in names:
            trainable = not self.peft_config[name].inference_mode
            for p in self._params[name]:
                p.requires_grad_(trainable)

    def _apply_active(self) -> None:
        """Point every adapter layer at the shared list of active names; recompute requires_grad."""
        self._params = {name: [] for name in self.peft_config}  # adapter -> its parameters
        for layer in adapter_layers(self.model):
            layer.active_adapters = self._active
            tables = (layer.lora_A, layer.lora_B) if isinstance(layer, LoRALinear) else (layer.modules_to_save,)
            for table in tables:
                for name, module in table.items():
                    self._params[name].extend(module.parameters())
        trainable = [n for n in self._active if not self.peft_config[n].inference_mode]
        bias = self.peft_config[self._active[0]].bias if self._active else "none"
        mark_trainable(self.model, trainable, bias)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its weights. If it was active, the first remaining one is."""
        self._check_exists([adapter_name])
        for layer in adapter_layers(self.model):
            if isinstance(layer, LoRALinear) and adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
            elif isinstance(layer, ModulesToSave) and adapter_name in layer.modules_to_save:
                del layer.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        self._active[:] = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
        self._apply_active()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None) -> dict[str, float]:
        """A new adapter ≈ Σ wᵢ adapters[i] ("cat": exact, "linear": approximate, "svd": best rank-k).
        Returns the energy each "svd" layer keeps (fraction of Σσ²). See minilora/combine.py."""
        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes exactly what the base model computes."""
        layers = adapter_layers(self.model)
        merged = [l for l in layers if isinstance(l, LoRALinear) and l.merged]
        if merged:
            raise RuntimeError("adapters are merged into the weights; call unmerge_adapter() before disabling")
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory, selected_adapters: Optional[list[str]] = None, **_ignored) -> None:
        """PEFT's layout: adapter_config.json + adapter_model.safetensors; non-default adapters in
        subdirectories. Extra PEFT keyword arguments (safe_serialization, ...) are accepted and ignored:
        minilora always writes safetensors."""
        save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False, **_ignored) -> "LoraModel":
        """Wrap `model` with the adapter saved in `model_id` (by minilora or by PEFT), active.
        Frozen and in eval mode unless `is_trainable`."""
        wrapped = cls(model, None)
        load_adapter(wrapped, model_id, adapter_name, is_trainable)
        wrapped.set_adapter(adapter_name)
        return wrapped if is_trainable else wrapped.eval()

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, **_ignored) -> None:
        """Add the adapter saved in `model_id` under `adapter_name`; active adapters don't change."""
        load_adapter(self, model_id, adapter_name, is_trainable)

    # ------------------------------------------------------------------ merging
    def _lora_layers(self) -> list[LoRALinear]:
        return [m for m in adapter_layers(self.model) if isinstance(m, LoRALinear)]

    def merge_adapter(self, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the (active, or named) adapters into the base weights. Idempotent."""
        names = adapter_names or self.active_adapters
        self._check_exists(names)
        for layer in self._lora_layers():
            layer.merge([n for n in names if n in layer.lora_A])

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights. Idempotent."""
        for layer in self._lora_layers():
            layer.unmerge()

    def _unload(self, merge: bool, adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names)
        else:
            self.unmerge_adapter()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoRALinear):
                _set_submodule(self.model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                _set_submodule(self.model, name, module.active_module if merge else module.original_module)
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def merge_and_unload(self, adapter_names: Optional[list[str]] = None,
                         requantize: Union[bool, NF4Config] = False) -> nn.Module:
        """The plain HF model with the adapters folded in (and the trained head copies in place).

        A 4-bit (QLoRA) base is dequantized first, so the result is W_hat + (α/r)·B·A in full
        precision, exact with respect to the dequantized base. With `requantize` (True, or an
        NF4Config) those layers are quantized again and `self.merge_report` says what that cost:
        the relative error ‖Q(W') − W'‖ / ‖W'‖ per layer."""
        quantized = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoRALinear) and isinstance(module.base_layer, Linear4bit):
                quantized[name] = module.base_layer.config
                module.base_layer = module.base_layer.to_float()
        merged = self._unload(merge=True, adapter_names=adapter_names)
        if requantize and quantized:
            errors = {}
            for name, config in quantized.items():
                dense = merged.get_submodule(name)
                layer = Linear4bit.from_float(dense, requantize if isinstance(requantize, NF4Config) else config)
                W = dense.weight.detach().float()
                W = W.t() if layer.from_conv1d else W  # (out, in)
                errors[name] = ((layer.dequantized_weight(torch.float32) - W).norm() / W.norm()).item()
                _set_submodule(merged, name, layer)
            self.merge_report = {"requantized_layers": len(errors), "relative_error": errors,
                                 "max_relative_error": max(errors.values()),
                                 "mean_relative_error": sum(errors.values()) / len(errors)}
        return merged

    def unload(self) -> nn.Module:
        """The plain HF model as it was before any adapter: LoRA removed, nothing merged."""
        return self._unload(merge=False)

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters; 4-bit weights count as their number of values, as in PEFT."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        print(format_trainable(*self.get_nb_trainable_parameters()))

    def parameter_breakdown(self) -> dict[str, dict[str, float]]:
        """Parameters per component (embeddings, attention, ffn, norm, head, lora, other)."""
        return parameter_breakdown(self.model)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """PEFT's entry point: wrap `model` (in place) with one adapter, active and trainable."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a minilora LoraConfig, got {type(peft_config).__name__}")
    return LoraModel(model, peft_config, adapter_name)
