"""QLoRA storage: NF4 with double-quantized scales, Linear4bit, and quantizing whole models."""

from .formats import fake_quantize, quantization_error
from .nf4 import DYNAMIC_MAP, NF4_LEVELS, NF4State, dynamic_map, nf4_dequantize, nf4_quantize
from .linear4bit import Linear4bit, NF4Config
from .model import MemoryReport, load_quantized, memory_report, quantize_model

__all__ = [
    "DYNAMIC_MAP", "NF4_LEVELS", "NF4State", "dynamic_map", "nf4_dequantize", "nf4_quantize",
    "Linear4bit", "NF4Config", "MemoryReport", "load_quantized", "memory_report", "quantize_model",
    "fake_quantize", "quantization_error",
]
