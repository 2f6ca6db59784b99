"""Training: the schedule, the data, the trainer with its forgetting monitor, and the embedded
fine-tuning comparison behind `minilora finetune`."""

from .data import Examples, load_examples, load_tokenizer
from .schedule import warmup_cosine
from .trainer import Trainer, TrainConfig, TrainResult

__all__ = ["warmup_cosine", "Trainer", "TrainConfig", "TrainResult", "Examples", "load_examples", "load_tokenizer"]
