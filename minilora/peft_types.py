"""PEFT's enumerations and its config base class, under PEFT's names.

    TaskType.CAUSAL_LM == "CAUSAL_LM"          # a str: LoraConfig(task_type=TaskType.CAUSAL_LM) or "CAUSAL_LM";
                                               # the config keeps the member, as PEFT's does
    PeftType.LORA == "LORA"                    # minilora has LoRA only; PEFT's other methods are listed
                                               # so that a config naming them is refused by name
    PeftConfig.from_pretrained(directory)      # the LoraConfig an adapter directory holds
    isinstance(LoraConfig(), PeftConfig)       # True
"""

from __future__ import annotations

import abc
import enum
from pathlib import Path
from typing import Union

from .adapter_files import CONFIG_NAME, read_config_file
from .config import LoraConfig


class TaskType(str, enum.Enum):
    """PEFT's task types; each is its own string."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """PEFT's adapter methods by name; minilora implements LORA (DoRA, rsLoRA, PiSSA, ... are LoRA's options)."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    IA3 = "IA3"
    OFT = "OFT"
    BOFT = "BOFT"
    VERA = "VERA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"


class PeftConfig(abc.ABC):
    """PEFT's base of every adapter config. minilora's one config, LoraConfig, is registered as its
    subclass: `isinstance(config, PeftConfig)` holds, and `PeftConfig.from_pretrained` reads any
    adapter directory's config."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], subfolder: str = "") -> LoraConfig:
        """The LoraConfig saved in a local adapter directory (adapter_config.json, by minilora or PEFT)."""
        directory = Path(pretrained_model_name_or_path) / subfolder
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}: pass a local adapter directory (minilora "
                                    "reads no hub)")
        return read_config_file(directory / CONFIG_NAME)


PeftConfig.register(LoraConfig)
