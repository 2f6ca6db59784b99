"""PEFT's model classes per task: each a LoraModel that names its task_type. `get_peft_model`,
`LoraModel.from_pretrained` (PEFT's `PeftModel.from_pretrained`) and the AutoPeftModel classes
give the one for the config's task_type (model.model_class_for); the behaviour is LoraModel's.
"""

from __future__ import annotations

from .model import LoraModel


class PeftModelForCausalLM(LoraModel):
    """A LoraModel of a causal LM (PEFT's class for task_type "CAUSAL_LM")."""

    task_type = "CAUSAL_LM"


class PeftModelForSeq2SeqLM(LoraModel):
    """A LoraModel of an encoder-decoder LM (task_type "SEQ_2_SEQ_LM")."""

    task_type = "SEQ_2_SEQ_LM"


class PeftModelForSequenceClassification(LoraModel):
    """A LoraModel of a sequence classifier (task_type "SEQ_CLS")."""

    task_type = "SEQ_CLS"


class PeftModelForTokenClassification(LoraModel):
    """A LoraModel of a token classifier (task_type "TOKEN_CLS")."""

    task_type = "TOKEN_CLS"


class PeftModelForQuestionAnswering(LoraModel):
    """A LoraModel of an extractive question answerer (task_type "QUESTION_ANS")."""

    task_type = "QUESTION_ANS"


class PeftModelForFeatureExtraction(LoraModel):
    """A LoraModel of an encoder whose hidden states are the output (task_type "FEATURE_EXTRACTION")."""

    task_type = "FEATURE_EXTRACTION"


TASK_MODELS = {c.task_type: c for c in (PeftModelForCausalLM, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                                         PeftModelForTokenClassification, PeftModelForQuestionAnswering,
                                         PeftModelForFeatureExtraction)}  # PEFT's MODEL_TYPE_TO_PEFT_MODEL_MAPPING
