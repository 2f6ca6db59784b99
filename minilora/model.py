"""LoraModel: a Hugging Face model with named LoRA adapters, and PEFT's API around it.

    model = get_peft_model(hf_model, LoraConfig(...))      # wraps in place, freezes the base
    model(**batch); model.generate(...)                    # the HF model's own forward / generate
    model.add_adapter("legal", cfg); model.set_adapter("legal")
    with model.disable_adapter(): ...                      # exactly the base model
    model.merge_adapter(); model.unmerge_adapter()         # fold (alpha/r)·B·A into W and back
    base = model.merge_and_unload()                        # a plain HF model again

Attributes the wrapper doesn't have are looked up on the HF model (`model.config`, ...).

LoraModel is the only owner of adapter state: `peft_config`, which adapters are active, which
parameters train. Every adapter comes to exist through one path, `_register` (from a config,
from files, or combined from others); adapter_files.py and combine.py are functions over plain data that
it calls. Every adapter layer reads one shared `AdapterState` in its forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from . import checkpointed_routing, combine, hotswap, mixing
from .config import LoraConfig
from .families import DEFAULT_TARGETS
from .adapter_layer import AdapterLayer, AdapterState
from .model_files import AdapterFiles
from .transformers_methods import ActiveAdapters, TransformersAdapterMethods
from .unload import MergeAndUnload
from .merge_methods import MergeOptions
from .params import count_parameters, format_trainable, parameter_breakdown
from .roles import walk
from .signature import bind_forward
from .state_names import accept_earlier_names, check_adapter_name, fill_tied_parameters
from .state_names import get_base_model_state_dict, set_base_model_state_dict  # noqa: F401  (importable from here too)
from .surgery import (
    AdapterPlan,
    ModulesToSave,
    apply_plan,
    plan_adapter,
    trained_biases,
)



def _name_the_default_loss(model: nn.Module) -> None:
    """transformers (5.25 and later) logs a warning each time a model whose `loss_type` is None (GPT-2,
    among others) computes its loss, then uses "ForCausalLM"; under torch.compile(fullgraph=True) that
    log call is a graph break, so `model(input_ids, labels=...)` does not compile as one graph.
    Naming the loss it falls back to anyway changes no number and removes the log call."""
    if "loss_type" in vars(model) and model.loss_type is None and hasattr(type(model), "loss_function"):
        model.loss_type = "ForCausalLM"


class LoraTuner(nn.Module):
    """PEFT's middle level, `peft_model.base_model`: it holds the HF model as `.model`, so every
    parameter is named `base_model.model.<path>` as in PEFT. Calling it runs the HF model; other
    attributes are the LoraModel's (its methods, `peft_config`) and through it the HF model's."""

    def __init__(self, model: nn.Module, owner: "LoraModel"):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds this one

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_owner") or "_owner" not in self.__dict__:
                raise
            return getattr(self.__dict__["_owner"], name)


class LoraModel(AdapterFiles, MergeAndUnload, TransformersAdapterMethods, nn.Module):
    """A HF model whose target layers carry LoRA adapters. `self.model` (PEFT's
    `self.base_model.model`) is the HF model."""

    def __init__(self, model: nn.Module, config: Optional[LoraConfig], adapter_name: str = "default"):
        super().__init__()
        self.base_model = LoraTuner(model, self)
        self.peft_config: dict[str, LoraConfig] = {}
        self._state = AdapterState()  # read by every adapter layer: active names, disabled, routing
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its parameters (for set_adapter)
        self.mixed_batch_method = "gather"  # adapter_names: "gather" (batched matmuls) or "segments"
        bind_forward(self, model)  # inspect.signature(self.forward) names the HF model's inputs
        _name_the_default_loss(model)
        self._take_over_earlier_adapters(adapter_name if config is not None else None)
        self.register_load_state_dict_pre_hook(accept_earlier_names)  # first: the next hook reads today's names
        self.register_load_state_dict_pre_hook(fill_tied_parameters)
        if config is not None:  # None: adapters come later, from files (`from_pretrained`)
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def _take_over_earlier_adapters(self, replaced: Optional[str]) -> None:
        """A base wrapped a second time (a second get_peft_model, as PEFT allows): its adapter layers
        now read this model's state, and an earlier adapter named `replaced` gives way to the new one.
        Other earlier adapters stay in the layers, inactive and unregistered here."""
        layers = [m for _, m in walk(self.model) if isinstance(m, (AdapterLayer, ModulesToSave))]
        if not layers:
            return
        warnings.warn("this model already carries minilora adapters from an earlier get_peft_model: the new "
                      f"LoraModel takes over its layers{f' and replaces adapter {replaced!r}' if replaced else ''}; "
                      "use add_adapter on one LoraModel to keep several adapters", stacklevel=3)
        for layer in layers:
            layer.state = self._state
            if replaced is not None and layer.has_adapter(replaced):
                layer.delete_adapter(replaced)

    # ------------------------------------------------------------------ passthrough
    def forward(self, *args, labels=None, adapter_names: Optional[list[str]] = None,
                adapter_weights: Optional[dict[str, float]] = None, **kwargs):
        """The HF model's forward. `adapter_names`: one adapter (or "__base__") per batch row, each
        row's loss reaching its own adapter only (in training too). `adapter_weights`: {adapter:
        weight}, the weighted sum of their low-rank paths.
        `labels` is named because transformers' Trainer finds label names in the class's forward;
        each instance's forward shows the HF model's own signature (see signature.py)."""
        if labels is not None:
            kwargs["labels"] = labels
        with self.routed(self._routing(adapter_names, adapter_weights, args, kwargs)):
            return self.model(*args, **kwargs)

    def compile(self, *args, **kwargs) -> None:
        """nn.Module.compile on the HF model inside: this wrapper's Python (per-call adapter_names made
        slot tensors, checks) runs before the graph, so no name specialises it (hotswap.py)."""
        self.model.compile(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None,
                 adapter_weights: Optional[dict[str, float]] = None, **kwargs):
        """The HF model's generate, with the same per-row / weighted adapter choice as forward."""
        with self.routed(self._routing(adapter_names, adapter_weights, args, kwargs)):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def routed(self, routing: Optional[mixing.Routing]) -> Iterator[None]:
        """Inside this block every adapter layer applies `routing` (see mixing.py). None changes
        nothing: a plain call inside a routed block keeps the block's routing."""
        if routing is None:
            yield
            return
        previous, self._state.routing = self._state.routing, routing
        try:
            yield
        finally:
            self._state.routing = previous

    def adapters_per_row(self, adapter_names: list[str]):
        """A block in which every call runs row b with adapter adapter_names[b] (as forward's adapter_names=)."""
        return self.routed(self._routing(adapter_names, None, (), {}))

    def _routing(self, adapter_names, adapter_weights, args, kwargs) -> Optional[mixing.Routing]:
        """The Routing for one call's `adapter_names` / `adapter_weights`, checked; None if neither."""
        if adapter_names is None and adapter_weights is None:
            return None
        if self._state.hotswap is None and any(layer.merged for layer in self._lora_layers().values()):
            raise ValueError("adapters are merged into the weights; call unmerge_adapter() before choosing adapters per call")
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = ids.shape[0] if isinstance(ids, torch.Tensor) else None
        routing = mixing.routing_for(adapter_names, adapter_weights, set(self.peft_config), rows, self.mixed_batch_method)
        if self.training:  # a checkpointed layer must recompute with this call's adapters
            checkpointed_routing.check(self.model)
        return routing if self._state.hotswap is None else hotswap.row_routing(self, routing)  # names as slots

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name in ("model", "base_model"):
                raise
            return getattr(self.model, name)

    @property
    def model(self) -> nn.Module:
        """The HF model."""
        return self.base_model.model

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        bind_forward(self, self.model)  # unpickled, the instance forward comes back as the class's

    def push_to_hub(self, *args, **kwargs):
        """Not offered: the HF model's own push_to_hub (which attribute passthrough would reach) would
        upload the whole base model, not the adapter."""
        raise NotImplementedError("minilora does not upload: save_pretrained(dir) writes the adapter in PEFT's "
                                  "format; upload that directory with huggingface_hub (upload_folder)")

    def get_base_model(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> ActiveAdapters:
        """The active adapters' names (PEFT's property; transformers' call `active_adapters()` works too)."""
        return ActiveAdapters(self._state.active)

    @property
    def active_adapter(self) -> Union[str, list[str], None]:
        """The active adapter's name; a list when several are active, as in PEFT."""
        active = self._state.active
        return active[0] if len(active) == 1 else (list(active) if active else None)

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths of the modules that carry LoRA, in the order adapters first targeted them, as PEFT lists them."""
        layers = self._lora_layers()
        first: dict[str, None] = {}
        for name in self.peft_config:  # the order the adapters came in
            first.update(dict.fromkeys(path for path, layer in layers.items() if layer.has_adapter(name)))
        return [*first, *(path for path in layers if path not in first)]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The modules_to_save of all adapters together (PEFT's attribute); None when there are none."""
        names = {m for config in self.peft_config.values() for m in config.modules_to_save or []}
        return names or None

    def add_adapter(self, adapter_name: str, peft_config: Optional[LoraConfig] = None,
                    low_cpu_mem_usage: bool = False, *, config: Optional[LoraConfig] = None) -> None:
        """Add an adapter (not active until `set_adapter`); targets are resolved on this model.
        `peft_config` is PEFT's name for the config; `config=` is accepted too. `low_cpu_mem_usage`:
        PEFT's; the adapter is created at once, on its base layer's device, either way."""
        config = peft_config if peft_config is not None else config
        if not isinstance(config, LoraConfig):
            raise TypeError(f"add_adapter needs a minilora LoraConfig as peft_config, got {type(config).__name__}")
        self._check_new(adapter_name)
        if sum(c.bias != "none" for c in [config, *self.peft_config.values()]) > 1:
            raise ValueError("LoraModel supports only 1 adapter with bias (as PEFT): when using several adapters, "
                             "set bias='none' for all of them")
        config = copy.deepcopy(config)
        if config.base_model_name_or_path is None:  # as PEFT: where the base came from, for AutoPeftModel
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        plan = plan_adapter(self.model, config)  # the one walk; adds PEFT's task heads to modules_to_save
        if config.target_modules is None and not config.target_parameters:  # as PEFT: the defaults, filled in
            config.target_modules = set(DEFAULT_TARGETS[self.model.config.model_type])
        self._register(adapter_name, config, plan)

    def _register(self, name: str, config: LoraConfig, plan: AdapterPlan) -> None:
        """The one way an adapter comes to exist (added, loaded or combined): `plan` carried out
        (LoRA layers, trained copies, trainable tokens) and requires_grad set. Its cost does not
        grow with the number of adapters already loaded."""
        if self._state.hotswap is not None:  # a compiled graph serves it only at the shapes prepared
            hotswap.check_new(self, name, config, plan)
        layers, copies = apply_plan(self.model, plan, name, config, self._state)
        if not self.peft_config:  # the first adapter freezes the base
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.peft_config[name] = config
        self._params[name] = [p for layer in layers for p in layer.adapter_parameters(name)]
        self._params[name] += [p for wrapper in copies for p in wrapper.modules_to_save[name].parameters()]
        if self._state.hotswap is not None:
            hotswap.store(self, name)
        self._update_trainable([name])

    def _update_trainable(self, names: list[str], frozen: bool = False) -> None:
        """requires_grad for the parameters of adapters `names` (active and not inference_mode), and
        for the base biases that the first active adapter trains (its `bias`). `frozen`: none trains,
        nor does any adapter of a model prepared for compiled hotswap (it serves them, hotswap.py)."""
        frozen = frozen or self._state.hotswap is not None
        for name in names:
            trainable = name in self._state.active and not self.peft_config[name].inference_mode and not frozen
            for p in self._params[name]:
                p.requires_grad_(trainable)
        if all(c.bias == "none" for c in self.peft_config.values()):
            return  # no adapter trains biases: nothing to recompute
        first = self.peft_config.get(self.active_adapter)
        chosen = trained_biases(self.model, first.bias) if first and not (first.inference_mode or frozen) else {}
        for path, p in trained_biases(self.model, "all").items():
            p.requires_grad_(path in chosen)

    def _check_new(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name, reserved=mixing.BASE)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first or pick "
                f"another name (existing: {sorted(self.peft_config)})"
            )

    def _check_exists(self, names: list[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; available adapters: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make these adapters the active ones, trainable unless `inference_mode` (as PEFT's: an adapter
        loaded for inference becomes trainable here too); the others stay but sleep.
        Two active adapters may not both have a trained copy of one module (modules_to_save): a copy
        replaces the module rather than adding to it, so that is refused, as in PEFT.

        Every adapter layer reads the same state, so a switch rewrites one list and flips
        requires_grad on the adapters going out and coming in: its cost does not grow with the
        number of adapters loaded."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_exists(names)
        shared = self._shared_copies(names) if len(names) > 1 else []
        if shared:
            raise ValueError(f"Only one adapter can be set at a time for a module trained in full (modules_to_save): "
                             f"adapters {names} each have a copy of {shared}; activate one of them")
        changed = list(dict.fromkeys([n for n in self._state.active if n not in names] + names))
        if self._state.hotswap is not None:  # one slot index written in place; adapters stay frozen
            return hotswap.point(self, names)
        self._state.active[:] = names
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._update_trainable(changed)

    def _shared_copies(self, names: list[str]) -> list[str]:
        """Paths of the modules of which more than one of adapters `names` has a trained copy."""
        return [path for path, m in walk(self.model)
                if isinstance(m, ModulesToSave) and sum(n in m.modules_to_save for n in names) > 1]

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Make the parameters of these adapters (LoRA factors and trained copies) trainable or frozen,
        whether they are active or not, as PEFT's `set_requires_grad`. The next set_adapter,
        enable_adapter_layers or delete_adapter sets them from the active adapters again."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_exists(names)
        if requires_grad and self._state.hotswap is not None:
            raise ValueError("a model prepared for compiled hotswap serves its adapters from stacked copies and does not "
                             "train them; train the adapter on a model that was not prepared, then load it here")
        for name in names:
            for p in self._params[name]:
                p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its weights. If it was active, the first remaining one is."""
        self._check_exists([adapter_name])
        for layer in self._adapter_modules(adapter_name).values():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name], self._params[adapter_name]
        active = [n for n in self._state.active if n != adapter_name] or list(self.peft_config)[:1]
        if self._state.hotswap is not None:
            hotswap.forget(self, adapter_name)
            hotswap.point(self, active)
        self._state.active[:] = active
        self._update_trainable(self.active_adapters)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total", seed: Optional[int] = None,
                             svd_full_matrices: bool = True, svd_driver: Optional[str] = None) -> dict[str, float]:
        """A new adapter ≈ Σ wᵢ adapters[i] ("cat": exact, "linear": approximate, "svd": best rank-k;
        PEFT's "ties", "dare_linear", "dare_ties", "magnitude_prune" and their "_svd" forms keep a
        `density` of each adapter's entries, ties electing signs by `majority_sign_method`; DARE draws
        its masks from `seed`). Returns the energy each "*svd" layer keeps (fraction of Σσ²), keyed
        "path:part". See combine.py and merge_methods.py. PEFT's svd_full_matrices / svd_driver
        change nothing in the truncated result and are accepted as such.
        A module trained in full (modules_to_save) by one of the adapters is copied, trained weights
        and all, into the new adapter; a module that several of them train cannot be combined."""
        return combine.add_weighted(self, adapters, weights, adapter_name, combination_type, svd_rank,
                                    MergeOptions(density=density, majority_sign_method=majority_sign_method,
                                                 seed=seed, svd_clamp=svd_clamp))

    @contextlib.contextmanager
    def adapters_acting(self, names: list[str]) -> Iterator[None]:
        """Inside this block exactly adapters `names` act, as after set_adapter(names), and nothing
        else changes (which parameters train, the configs): a reference policy read from another
        adapter of the same model (train/reference.py) computes what that adapter alone computes."""
        self._check_exists(names)
        if self._state.hotswap is not None:
            raise ValueError("a model prepared for compiled hotswap switches adapters with set_adapter only")
        before = list(self._state.active)
        self._state.active[:] = names
        try:
            yield
        finally:
            self._state.active[:] = before

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes exactly what the base model computes, and no adapter
        parameter requires a gradient. Merged adapters are unmerged first (and stay unmerged), as PEFT does."""
        was_disabled = self._state.disabled
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if not was_disabled:
                self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until `enable_adapter_layers()`: base outputs, no adapter gradients."""
        for active in self._state.active:
            if self.peft_config[active].bias != "none":
                warnings.warn(f"adapter {active!r} trains biases (bias={self.peft_config[active].bias!r}): with the "
                              "adapters disabled the model still has the trained biases, not the base's", stacklevel=2)
        self.unmerge_adapter()
        self._state.disabled = True
        for name in self.peft_config:
            for p in self._params[name]:
                p.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Switch the active adapters back on (and trainable, unless loaded for inference)."""
        self._state.disabled = False
        self._update_trainable(self.active_adapters)

    def _adapter_modules(self, name: str) -> dict[str, nn.Module]:
        """Module path -> the adapter layer or ModulesToSave holding adapter `name`."""
        return {path: m for path, m in walk(self.model)
                if isinstance(m, (AdapterLayer, ModulesToSave)) and m.has_adapter(name)}

    def _lora_layers(self) -> dict[str, nn.Module]:
        """Module path -> adapter layer."""
        return {path: m for path, m in walk(self.model) if isinstance(m, AdapterLayer)}

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters; 4-bit weights count as their number of values, as in PEFT."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        print(format_trainable(*self.get_nb_trainable_parameters()))

    def parameter_breakdown(self) -> dict[str, dict[str, float]]:
        """Parameters per component (embeddings, attention, ffn, norm, head, lora, other)."""
        return parameter_breakdown(self.model)


def model_class_for(task_type: Optional[str]) -> type:
    """PEFT's class for a task_type (task_models.py: PeftModelForCausalLM, ...); LoraModel (PEFT's
    PeftModel) for None or a task without one."""
    return next((c for c in LoraModel.__subclasses__() if c.task_type == task_type), LoraModel)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> LoraModel:
    """PEFT's entry point: wrap `model` (in place) with one adapter, active and trainable; the class
    is PEFT's for the config's task_type (PeftModelForCausalLM, ...), all of them LoraModels.
    `autocast_adapter_dtype`, `revision`, `low_cpu_mem_usage`: PEFT's, accepted (the adapter is
    created in fp32 on the base's device, as PEFT's autocast does); `mixed=True` (PEFT's mixed model
    of several adapter kinds) is refused: minilora has one kind."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a minilora LoraConfig, got {type(peft_config).__name__}")
    if mixed:
        raise ValueError("mixed=True builds PEFT's PeftMixedModel of several adapter kinds; minilora has LoRA only: "
                         "leave mixed out and add LoRA adapters with add_adapter")
    return model_class_for(peft_config.task_type)(model, peft_config, adapter_name)
