"""PEFT's AutoPeftModel classes: an adapter directory in, the base model it names loaded and wrapped.

    model = AutoPeftModelForCausalLM.from_pretrained("adapter_dir")   # base: adapter_config.json's
                                                                      # base_model_name_or_path
    model = AutoPeftModel.from_pretrained("adapter_dir")              # the class from its task_type

The base is read with transformers' Auto class for the task (keyword arguments such as `dtype` or
`quantization_config` go to it), from a local directory: minilora reads no hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import transformers

from .config import LoraConfig
from .model import LoraModel
from .task_models import TASK_MODELS
from .peft_types import PeftConfig

AUTO_CLASSES = {  # task_type -> transformers' class that loads its base
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class AutoPeftModel:
    """Loads an adapter directory's base and the adapter on it; `task_type` None: from the adapter's config."""

    task_type: Optional[str] = None

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is designed to be instantiated with "
                               f"`{type(self).__name__}.from_pretrained(adapter_dir)`")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None, revision: Optional[str] = None,
                        **kwargs) -> LoraModel:
        """The adapter in `pretrained_model_name_or_path` on its base model (read from the local directory
        its config names); `kwargs` go to the base's from_pretrained."""
        adapter_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path)
        base_path = adapter_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{pretrained_model_name_or_path}: the adapter's config names no base model "
                             "(base_model_name_or_path); load the base yourself and use PeftModel.from_pretrained")
        if not Path(base_path).is_dir():
            raise FileNotFoundError(f"the base model {base_path!r} that {pretrained_model_name_or_path} names is not a "
                                    "local directory; minilora reads no hub: load the base yourself and use "
                                    "PeftModel.from_pretrained(base, adapter_dir)")
        task_type = cls.task_type or adapter_config.task_type
        if cls.task_type and adapter_config.task_type and adapter_config.task_type != cls.task_type:
            raise ValueError(f"{pretrained_model_name_or_path} holds a {adapter_config.task_type} adapter; "
                             f"{cls.__name__} loads {cls.task_type} ones: use AutoPeftModel, or the class for "
                             f"{adapter_config.task_type}")
        if task_type not in AUTO_CLASSES:
            raise ValueError(f"{pretrained_model_name_or_path}: task_type {task_type!r} has no transformers Auto class "
                             f"here; choose from {', '.join(AUTO_CLASSES)}, or load the base yourself")
        auto = getattr(transformers, AUTO_CLASSES[task_type])
        base = auto.from_pretrained(base_path, revision=revision, **kwargs) if revision else \
            auto.from_pretrained(base_path, **kwargs)
        return TASK_MODELS[task_type].from_pretrained(base, pretrained_model_name_or_path, adapter_name,
                                                          is_trainable=is_trainable, config=config)


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = "SEQ_CLS"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = "FEATURE_EXTRACTION"
