"""The training library: the schedule, the data and its tasks, the trainer with its forgetting
monitor, checkpoints and distribution. The embedded experiments are minilora.experiments."""

from .data import Examples, load_tokenizer
from .chunked_loss import use_chunked_loss
from .preference import PreferenceSettings
from .schedule import warmup_cosine
from .tasks import load_examples
from .trainer import Trainer, TrainConfig, TrainResult

__all__ = ["warmup_cosine", "Trainer", "TrainConfig", "TrainResult", "PreferenceSettings", "use_chunked_loss", "Examples", "load_examples", "load_tokenizer"]
