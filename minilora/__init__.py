"""minilora: LoRA and QLoRA from scratch on PyTorch. The public API, and nothing else."""

from . import presets, renamed
from .config import Band, LoraConfig
from .exporting import export
from .kbit import prepare_model_for_kbit_training
from .lora import LoraLinear
from .model import LoraModel, get_base_model_state_dict, get_peft_model, set_base_model_state_dict
from .params import format_breakdown
from .pruning import prune
from .quant import NF4Config, load_quantized, memory_report, quantize_model
from .unload import requantization_report

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
    "load_quantized",
    "memory_report",
    "prepare_model_for_kbit_training",
    "presets",
    "prune",
    "quantize_model",
    "requantization_report",
    "set_base_model_state_dict",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    if name == "ARTICLE_BANDS":
        return renamed.earlier_name(__name__, name, {name: "minilora.presets.ARTICLE_BANDS"}, globals(),
                                    why="one preset's bands, beside its plan")
    return renamed.earlier_name(__name__, name, {"LoRALinear": "LoraLinear"}, globals())
