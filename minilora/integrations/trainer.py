"""transformers' Trainer with PEFT's treatment of a minilora LoraModel: adapter checkpoints.

    from minilora.integrations import LoraTrainer  # instead of: from transformers import Trainer
    trainer = LoraTrainer(model=lora_model, args=TrainingArguments(...), ...)

A plain `transformers.Trainer` already trains and evaluates a LoraModel: the model's forward shows
the HF model's inputs and names `labels` (see minilora/signature.py). What it cannot do is save the
adapter: the Trainer gives special treatment to PEFT's classes only (`isinstance(model, PeftModel)`)
and saves any other model as one full state dict, the frozen base included, which safetensors
refuses outright when the head is tied to the embeddings (GPT-2). `LoraTrainerMixin` gives a
LoraModel the treatment PEFT's models get, by overriding the three Trainer methods that hold it:

- `_save`: `model.save_pretrained(dir)` — adapter_config.json + adapter_model.safetensors in PEFT's
  format (other adapters in subdirectories) — plus the tokenizer and training_args.bin. The Trainer
  still writes its optimizer, scheduler, RNG and trainer_state files beside them;
- `_load_from_checkpoint` (resume_from_checkpoint) and `_load_best_model` (load_best_model_at_end):
  copy the checkpoint's adapter weights into the adapters of the same name, in place, so the
  optimizer keeps its parameters. A checkpoint without adapter files is left to the Trainer;
- label names come from the HF model's class, as the Trainer does for PEFT (so a question-answering
  model's `start_positions` / `end_positions` count as labels).

Under DeepSpeed or FSDP the Trainer's own saving and loading are kept (see `sharded`).

The checkpoint directory is an ordinary adapter directory: `LoraModel.from_pretrained(base, dir)`
loads it, and so does PEFT's `PeftModel.from_pretrained`. Mix the class into any Trainer subclass:
`class MyTrainer(LoraTrainerMixin, SomeTrainer)`; see trl.py for TRL's SFTTrainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from .. import renamed
from ..adapter_files import adapter_directory
from ..model import LoraModel

CONFIG_FILE = "adapter_config.json"


class LoraTrainerMixin:
    """Mix into a transformers Trainer (first in the bases) to save and load a LoraModel's adapters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        lora = self.lora_model()
        if lora is not None and self.args.label_names is None:
            base = type(lora.get_base_model())
            self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)

    def lora_model(self, model: Optional[torch.nn.Module] = None) -> Optional[LoraModel]:
        """The LoraModel being trained (inside any accelerate wrapper), or None for another model."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, LoraModel) else None

    def sharded(self) -> bool:
        """DeepSpeed or FSDP: parameters are sharded across processes and the Trainer gathers them
        itself, so its own saving and loading are kept."""
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        lora = self.lora_model()
        if lora is None or self.sharded():
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        lora.save_pretrained(output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:  # as the Trainer: the data collator's tokenizer, if it has one
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        lora = self.lora_model(model)
        if lora is None or self.sharded() or not restore_adapters(lora, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        return None

    def _load_best_model(self) -> None:
        lora = self.lora_model()
        if lora is None or self.sharded() or not restore_adapters(lora, self.state.best_model_checkpoint):
            return super()._load_best_model()
        return None


class LoraTrainer(LoraTrainerMixin, transformers.Trainer):
    """transformers.Trainer that checkpoints a LoraModel as its adapters (PEFT's format)."""


def restore_adapters(model: LoraModel, directory: Union[str, Path]) -> list[str]:
    """Copy the adapters saved under `directory` (by `save_pretrained`) into the model's adapters of
    the same names, in place: the parameters stay the same objects, so an optimizer holding them
    resumes where it was. Returns the names restored (none if `directory` holds no adapter).

    Each is loaded under a temporary name through `load_adapter` (which reads PEFT's and
    minilora's files alike and checks them), copied tensor by tensor, and deleted."""
    restored = []
    for name in list(model.peft_config):
        source = adapter_directory(directory, name)
        if not (source / CONFIG_FILE).is_file():
            continue
        staging = f"{name}_checkpoint"
        while staging in model.peft_config:
            staging += "_"
        model.load_adapter(source, staging)
        try:
            copy_adapter(model, staging, name, source)
        finally:
            model.delete_adapter(staging)
        restored.append(name)
    return restored


@torch.no_grad()
def copy_adapter(model: LoraModel, source: str, target: str, where: Path) -> None:
    """Copy every tensor of adapter `source` into adapter `target`: the state-dict keys of an
    adapter's weights hold its name as one dotted component, the rest of the key is the same."""
    state = model.state_dict()
    pairs = {key: ".".join(target if p == source else p for p in key.split("."))
             for key in state if source in key.split(".")}
    misfits = [dest for key, dest in pairs.items() if dest not in state or state[dest].shape != state[key].shape]
    misfits += [key for key in state if target in key.split(".") and key not in pairs.values()]  # not in the file
    if misfits or not pairs:
        raise ValueError(f"the adapter in {where} does not fit adapter {target!r} of this model (missing, extra or "
                         f"of another shape: {misfits[:3] or 'every weight'}); it was saved from another configuration "
                         "(rank, targets): load it with LoraModel.from_pretrained instead of resuming into this adapter")
    for key, dest in pairs.items():
        state[dest].copy_(state[key])


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    return renamed.earlier_name(__name__, name, {"Trainer": "LoraTrainer"}, globals())
