"""minilora: LoRA and QLoRA from scratch on PyTorch. The public API, and nothing else."""

from . import presets, renamed
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                   AutoPeftModelForTokenClassification)
from .config import Band, LoraConfig
from .exporting import export
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .kbit import prepare_model_for_kbit_training
from .lora import LoraLinear
from .model import LoraModel, get_base_model_state_dict, get_peft_model, set_base_model_state_dict
from .params import format_breakdown
from .peft_functions import (get_layer_status, get_model_status, get_peft_model_state_dict, inject_adapter_in_model,
                             load_peft_weights, set_peft_model_state_dict)
from .peft_types import PeftConfig, PeftType, TaskType
from .pruning import prune
from .quant import NF4Config, load_quantized, memory_report, quantize_model
from .task_models import (PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                          PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification)
from .unload import requantization_report

PeftModel = LoraModel  # PEFT's name for the wrapped model: minilora's LoraModel plays that part

PEFT_NAMES = [  # PEFT's public names, with PEFT's behaviour (docs/peft-users.md)
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "PeftConfig", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftType", "TaskType", "get_layer_status", "get_model_status",
    "get_peft_model_state_dict", "inject_adapter_in_model", "load_peft_weights", "set_peft_model_state_dict",
]
__all__ = [
    "Band",
    "LoraLinear",
    "LoraConfig",
    "LoraModel",
    "NF4Config",
    "export",
    "format_breakdown",
    "get_base_model_state_dict",
    "get_peft_model",
    "hotswap_adapter",
    "load_quantized",
    "memory_report",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "presets",
    "prune",
    "quantize_model",
    "requantization_report",
    "set_base_model_state_dict",
    *PEFT_NAMES,
]
__version__ = "0.1.0"


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    if name == "ARTICLE_BANDS":
        return renamed.earlier_name(__name__, name, {name: "minilora.presets.ARTICLE_BANDS"}, globals(),
                                    why="one preset's bands, beside its plan")
    return renamed.earlier_name(__name__, name, {"LoRALinear": "LoraLinear"}, globals())
