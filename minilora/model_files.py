"""LoraModel's adapter files, PEFT's calls: save_pretrained, from_pretrained, load_adapter.

A mixin of LoraModel (model.py), which gives it `peft_config`, `model`, `add_adapter`,
`delete_adapter`, `set_adapter`, `_check_new`, `_check_exists` and `_adapter_modules`. The file
layout and the keys are adapter_files.py's; each adapter layer names its own tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch.nn as nn

from . import adapter_files, convert
from . import named_init
from . import hotswap as hotswap_module
from .config import LoraConfig
from .state_names import LoadResult
from .surgery import TASK_HEADS, has_module, peft_reads_targets_alike, trained_biases


class AdapterFiles:
    def save_pretrained(self, save_directory, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers="auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion=None) -> None:
        """PEFT's layout: adapter_config.json + adapter_model.safetensors (adapter_model.bin, a dict of
        tensors, with `safe_serialization=False`) and a model card; non-default adapters in
        subdirectories. `path_initial_model_for_weight_conversion`: the directory of this PiSSA / OLoRA
        adapter saved at initialisation; the adapter is then saved as a plain LoRA of twice the rank
        over the original base (convert.py). `is_main_process=False` writes nothing (the other
        processes of a distributed run). `save_embedding_layers`: PEFT's; an embedding table is saved
        only when the adapter trains it (modules_to_save, trainable tokens), whatever its value."""
        if not is_main_process:
            return
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_exists(names)
        base_name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        for name in names:
            config, modules = self.peft_config[name], self._adapter_modules(name)
            tensors, ranks = adapter_files.adapter_tensors(modules, name, config.use_rslora, trained_biases(self.model, config.bias))
            alike = peft_reads_targets_alike(self.model, config)
            written = adapter_files.peft_config_dict(config, modules, name, ranks, alike, base_name)
            if path_initial_model_for_weight_conversion is not None:
                initial = adapter_files.read_tensors(path_initial_model_for_weight_conversion)
                tensors, written, config = convert.to_plain_lora(tensors, initial, written, config)
            adapter_files.write_adapter(adapter_files.adapter_directory(save_directory, name), tensors, written, config, safe_serialization,
                             base_model=base_name or None)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, torch_device: Optional[str] = None) -> "AdapterFiles":
        """Wrap `model` with the adapter saved in `model_id` (by minilora or by PEFT), active.
        Frozen and in eval mode unless `is_trainable`. `config`: use this LoraConfig instead of
        the directory's adapter_config.json (as PEFT's `config=`). Called on LoraModel (PEFT's
        PeftModel), the class is PEFT's for the adapter's task_type (PeftModelForCausalLM, ...).
        The other keywords are PEFT's (see load_adapter)."""
        wrapped = cls.class_for_adapter(model_id, config)(model, None)
        wrapped.load_adapter(model_id, adapter_name, is_trainable, config=config, torch_device=torch_device,
                             autocast_adapter_dtype=autocast_adapter_dtype,
                             ephemeral_gpu_offload=ephemeral_gpu_offload, low_cpu_mem_usage=low_cpu_mem_usage)
        wrapped.set_adapter(adapter_name, inference_mode=not is_trainable)
        return wrapped if is_trainable else wrapped.eval()

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False,
                     config: Optional[LoraConfig] = None, torch_device: Optional[str] = None,
                     autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                     low_cpu_mem_usage: bool = False, hotswap: bool = False) -> "LoadResult":
        """Add the adapter saved in `model_id` under `adapter_name`; active adapters don't change.
        All or nothing: a file that does not fit leaves the model as it was, so the result PEFT
        returns (missing and unexpected keys) is always empty here, as PEFT's is for a file that fits.
        `torch_device`: where the adapter goes (default: beside its base layer, as PEFT).
        `autocast_adapter_dtype`, `ephemeral_gpu_offload`, `low_cpu_mem_usage`: PEFT's; the adapter is
        created in fp32 beside its base, then filled (PEFT's defaults), and `autocast_adapter_dtype=False`
        is refused (keeping a half-precision adapter in half precision is not built).
        `hotswap=True`: replace the existing adapter `adapter_name` instead, keeping which adapter is
        active; a model prepared for compiled hotswap does so without recompiling (hotswap.py)."""
        if hotswap:
            hotswap_module.replace_adapter(self, model_id, adapter_name, is_trainable=is_trainable, config=config,
                                           torch_device=torch_device, low_cpu_mem_usage=low_cpu_mem_usage,
                                           ephemeral_gpu_offload=ephemeral_gpu_offload,
                                           autocast_adapter_dtype=autocast_adapter_dtype)
            return LoadResult(missing_keys=[], unexpected_keys=[])
        if not autocast_adapter_dtype:
            raise ValueError("autocast_adapter_dtype=False keeps a half-precision adapter in half precision; minilora "
                             "trains and loads adapters in fp32: leave it at True")
        self._check_new(adapter_name)
        stored, tensors = adapter_files.read_adapter(model_id, with_config=config is None)
        config = copy.deepcopy(config) if config is not None else stored
        adapter_files.check_ranks(config, tensors, model_id)  # before a single layer is allocated
        config.inference_mode = not is_trainable
        if config.modules_to_save:  # PEFT lists every task head it might add, "score" on BERT included
            heads = {h for names in TASK_HEADS.values() for h in names}
            config.modules_to_save = [m for m in config.modules_to_save if m not in heads or has_module(self.model, m)]
        init = config.init_lora_weights
        if named_init.changes_base(init):  # PiSSA / OLoRA: the base given is already W_res; don't factorise it again
            config.init_lora_weights = True
        self.add_adapter(adapter_name, config)
        config = self.peft_config[adapter_name]
        config.init_lora_weights = init
        try:
            adapter_files.fill_adapter(self._adapter_modules(adapter_name), adapter_name, config.use_rslora,
                            trained_biases(self.model, config.bias), tensors, Path(model_id))
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if torch_device is not None:
            for p in self._params[adapter_name]:
                p.data = p.data.to(torch_device)
        return LoadResult(missing_keys=[], unexpected_keys=[])

    task_type: Optional[str] = None  # a task's class (model.py: PeftModelForCausalLM, ...) names its own

    @classmethod
    def class_for_adapter(cls, model_id, config: Optional[LoraConfig]) -> type:
        """`cls`, or, called on LoraModel itself (PEFT's PeftModel), its subclass for the adapter's task_type."""
        if cls.task_type is not None:
            return cls
        if config is None:
            try:
                config = adapter_files.read_config_file(adapter_files.adapter_directory(model_id, "default") /
                                                        adapter_files.CONFIG_NAME)
            except (OSError, ValueError):  # load_adapter says what is wrong with the directory
                return cls
        return next((c for c in cls.__subclasses__() if c.task_type == config.task_type), cls)

