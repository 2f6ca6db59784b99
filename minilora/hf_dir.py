"""A Hugging Face model directory, asked about in one place: its config, its weights, its tokenizer.

    config.json                 the model's config (required)
    model.safetensors           the weights, one file or sharded with an index (safetensors: loads
    model.safetensors.index.json  lazily, so a 4-bit load can stream them)
    pytorch_model.bin (+ .index.json)   the older pickle format
    tokenizer files             whichever its tokenizer saved (TOKENIZER_FILES), and
                                generation_config.json, which travel with the model when it is exported
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

CONFIG_FILE = "config.json"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
WEIGHT_FILES = SAFETENSORS_FILES + ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model")
GENERATION_FILE = "generation_config.json"


def _any(directory: Union[str, Path], names) -> bool:
    return any((Path(directory) / name).is_file() for name in names)


def has_config(directory: Union[str, Path]) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def has_weights(directory: Union[str, Path]) -> bool:
    return _any(directory, WEIGHT_FILES)


def has_safetensors(directory: Union[str, Path]) -> bool:
    return _any(directory, SAFETENSORS_FILES)


def has_tokenizer(directory: Union[str, Path]) -> bool:
    return _any(directory, TOKENIZER_FILES)


def looks_like_model_dir(path: Union[str, Path]) -> bool:
    """A directory holding a config or weights: what a user passing a path most likely meant as a model."""
    return Path(path).is_dir() and (has_config(path) or has_weights(path))


def companion_files(directory: Union[str, Path]) -> list[Path]:
    """The tokenizer and generation files present in `directory`: what an exported model carries along."""
    return [Path(directory) / name for name in (*TOKENIZER_FILES, GENERATION_FILE) if (Path(directory) / name).is_file()]
