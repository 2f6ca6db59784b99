"""TRL's trainers for minilora models, as TRL runs them for PEFT's: the adapter trains, the
reference policy is the same model with its adapter switched off (no second model is loaded), and
checkpoints are adapters.

    from minilora.integrations.trl import DPOTrainer    # instead of: from trl import DPOTrainer
    trainer = DPOTrainer(model=lora_model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok)
    trainer = DPOTrainer(model=hf_model, peft_config=minilora.LoraConfig(...), ...)   # TRL wraps it

SFTTrainer, DPOTrainer, RewardTrainer and GRPOTrainer are TRL's classes with two additions:

- TRL tells a PEFT model by its class (`accelerate.utils.is_peft_model`) and, for one, takes the
  reference policy from `model.disable_adapter()`, attaches its fused LM head to the transformers
  model inside (`get_base_model()`), and creates the model from `peft_config` with PEFT's
  `get_peft_model`. A model these trainers are given is marked as a PEFT-like model, and each TRL
  trainer module's `is_peft_model`, `PeftConfig` and `get_peft_model` are widened, once, on import:
  a marked minilora model counts as a PEFT model, a minilora LoraConfig as a PeftConfig, and
  `get_peft_model` of a minilora config is minilora's (which marks the model it returns). PEFT's
  models and configs go through TRL's code exactly as before, and so does an unmarked minilora
  model given to TRL's own classes.
- Checkpoints hold the adapter in PEFT's format (LoraTrainerMixin, trainer.py).

Without these, `trl.SFTTrainer(model=lora_model)` fails at its first step: TRL's fused LM head,
attached to the object it was given, calls `self.base_model(...)` for the backbone, which on a
LoraModel (as on PEFT's PeftModel) is the adapter wrapper; `trl.DPOTrainer(model=lora_model)`
loads a second copy of the base from disk for its reference. `peft_config=` needs `peft` installed
(TRL checks for it before reading the config).

Not supported, as with PEFT in TRL: a LoRA adapter on the LM head itself (the fused head reads
`lm_head.weight` directly, so the adapter would never train).
"""

from __future__ import annotations

import importlib

import trl
from accelerate.utils import extract_model_from_parallel

from .. import named_init
from ..adapter_layer import AdapterLayer
from ..config import LoraConfig
from ..model import LoraModel, get_peft_model as minilora_get_peft_model
from .trainer import LoraTrainerMixin

TRL_MODULES = ("sft_trainer", "dpo_trainer", "reward_trainer", "grpo_trainer")
MARK = "_trl_treats_as_peft"  # set on a LoraModel that one of these trainers was given or made


def _marked(model) -> bool:
    return isinstance(model, LoraModel) and getattr(model, MARK, False)


def _widen(module) -> None:
    """Teach one TRL trainer module minilora's models and config (see the module docstring)."""
    if getattr(module, "_minilora_widened", False):
        return
    original_is_peft_model = module.is_peft_model

    def is_peft_model(model) -> bool:
        return original_is_peft_model(model) or _marked(extract_model_from_parallel(model))

    module.is_peft_model = is_peft_model
    if hasattr(module, "PeftConfig"):  # defined when peft is installed
        original_get_peft_model = module.get_peft_model

        def get_peft_model(model, peft_config, *args, **kwargs):
            if not isinstance(peft_config, LoraConfig):
                return original_get_peft_model(model, peft_config, *args, **kwargs)
            kwargs.pop("autocast_adapter_dtype", None)  # TRL's ZeRO-3 setting; minilora's adapters are fp32
            wrapped = minilora_get_peft_model(model, peft_config, *args, **kwargs)
            setattr(wrapped, MARK, True)
            return wrapped

        module.PeftConfig = (module.PeftConfig, LoraConfig)
        module.get_peft_model = get_peft_model
    module._minilora_widened = True


for _name in TRL_MODULES:
    _widen(importlib.import_module(f"trl.trainer.{_name}"))


class LoraTrlMixin(LoraTrainerMixin):
    """Marks a given LoraModel for TRL's PEFT paths, refuses LoRA on the LM head, and checkpoints adapters."""

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        config = kwargs.get("peft_config")
        if (isinstance(self, (trl.DPOTrainer, trl.GRPOTrainer)) and isinstance(config, LoraConfig)
                and named_init.changes_base(config.init_lora_weights) and kwargs.get("ref_model") is None):
            raise ValueError(f"peft_config has init_lora_weights={config.init_lora_weights!r}, which rewrites the base "
                             "into a residual, and TRL takes the reference policy of an adapter it creates from that "
                             "adapter switched off: no trained model at all. Wrap the model first "
                             "(minilora.get_peft_model(model, config)) and pass it as model=: TRL then keeps a frozen "
                             "copy of the starting adapter as the reference, which is the original model")
        if isinstance(model, LoraModel):
            head = model.get_base_model().get_output_embeddings()
            if isinstance(head, AdapterLayer):  # LoRA, or trainable tokens of a tied head
                raise ValueError("a LoRA adapter (or trainable tokens of a tied table) on the LM head is not supported "
                                 "by TRL's trainers: their loss reads lm_head.weight directly, so the adapter would "
                                 "never train. Remove the head from target_modules (or train it whole with "
                                 "modules_to_save=['lm_head'])")
            setattr(model, MARK, True)
        super().__init__(*args, **kwargs)


class SFTTrainer(LoraTrlMixin, trl.SFTTrainer):
    """trl.SFTTrainer for a minilora LoraModel (or `peft_config=minilora.LoraConfig(...)`)."""


class DPOTrainer(LoraTrlMixin, trl.DPOTrainer):
    """trl.DPOTrainer for a minilora LoraModel: the reference is the model with its adapter switched off
    (for an adapter trained before, a frozen copy of it named "ref", as TRL does for PEFT)."""


class RewardTrainer(LoraTrlMixin, trl.RewardTrainer):
    """trl.RewardTrainer for a minilora LoraModel of a sequence classifier with one label."""


class GRPOTrainer(LoraTrlMixin, trl.GRPOTrainer):
    """trl.GRPOTrainer for a minilora LoraModel; with beta > 0 the reference is the adapter switched off."""
