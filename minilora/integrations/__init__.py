"""Glue between minilora and other libraries' training loops. The core never imports this package;
import it only if you train through transformers' Trainer or TRL.

    from minilora.integrations import LoraTrainer      # transformers' Trainer, adapter checkpoints
    from minilora.integrations.trl import SFTTrainer   # TRL's SFTTrainer, the same (needs trl)
"""

from .. import renamed
from .trainer import LoraTrainer, LoraTrainerMixin, restore_adapters

__all__ = ["LoraTrainer", "LoraTrainerMixin", "restore_adapters"]


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    return renamed.earlier_name(__name__, name, {"Trainer": "LoraTrainer"}, globals())
