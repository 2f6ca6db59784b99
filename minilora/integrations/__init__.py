"""Glue between minilora and other libraries' training loops. The core never imports this package;
import it only if you train through transformers' Trainer or TRL.

    from minilora.integrations import Trainer          # transformers' Trainer, adapter checkpoints
    from minilora.integrations.trl import SFTTrainer   # TRL's SFTTrainer, the same (needs trl)
"""

from .trainer import LoraTrainerMixin, Trainer, restore_adapters

__all__ = ["LoraTrainerMixin", "Trainer", "restore_adapters"]
