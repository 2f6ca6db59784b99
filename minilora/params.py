"""Counting parameters: PEFT's one-line summary and the article's per-component table.

    trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364

`parameter_breakdown` splits a model into embeddings, attention, ffn, norm, head, lora and other,
with counts, trainable counts and the share of the total: the table that shows where a GPT-2's
weights live (embeddings ≈ 31%, attention ≈ 23%, FFN ≈ 46%, norms < 0.1%).
"""

from __future__ import annotations

import re

import torch.nn as nn

from .quant.bnb_layers import stored_values
from .roles import ATTENTION_ROLES, classify

COMPONENTS = ("embeddings", "attention", "ffn", "norm", "head", "lora", "other")
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler", "cls")
_ATTN_WORDS = re.compile(r"attn|attention", re.IGNORECASE)
_FFN_WORDS = re.compile(r"mlp|ffn|feed_forward|DenseReluDense|intermediate|fc1|fc2|\.output\.dense")
_WRAPPERS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")


def quantized_weights(module: nn.Module) -> int:
    """Weights a quantized linear layer holds as packed codes (not as parameters); 0 otherwise."""
    if getattr(module, "LINEAR_LIKE", False) and not module.weight.is_floating_point():
        return module.in_features * module.out_features
    return 0


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as its number of values, as PEFT counts them
    (minilora's Linear4bit keeps it as buffers; bitsandbytes' as a Params4bit of packed bytes)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(stored_values(p) for p in model.parameters()) + sum(quantized_weights(m) for m in model.modules())
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    """PEFT's exact line."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def _component(path: str, module: nn.Module, roles: dict[str, str], head_paths: set[str]) -> str:
    """Which component a module's own parameters belong to. `path` has wrapper names removed."""
    if ".lora_" in f".{path}" or path.startswith("lora_"):
        return "lora"
    if path in head_paths or path.split(".")[0] in _HEAD_NAMES or path.rsplit(".", 1)[-1] in _HEAD_NAMES:
        return "head"
    if "norm" in type(module).__name__.lower():
        return "norm"
    role = roles.get(path)
    if role is not None:
        return "attention" if role in ATTENTION_ROLES or role == "q_k_v" else "ffn"
    if _ATTN_WORDS.search(path):
        return "attention"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if _FFN_WORDS.search(path):
        return "ffn"
    return "other"


def parameter_breakdown(model: nn.Module) -> dict[str, dict[str, float]]:
    """{component: {"params", "trainable", "percent"}} plus a "total" row; shared weights count once."""
    roles = {name: site.role for name, site in classify(model).items() if site.role}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_paths = {_WRAPPERS.sub("", n) for n, m in model.named_modules() if head is not None and m is head}
    rows = {c: {"params": 0, "trainable": 0} for c in COMPONENTS}
    seen = set()
    for path, module in model.named_modules():
        if quantized_weights(module):  # packed 4-bit weights are buffers; count their values
            rows[_component(_WRAPPERS.sub("", path), module, roles, head_paths)]["params"] += quantized_weights(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            row = rows[_component(_WRAPPERS.sub("", path), module, roles, head_paths)]
            row["params"] += param.numel()
            row["trainable"] += param.numel() if param.requires_grad else 0
    total = sum(r["params"] for r in rows.values())
    for row in rows.values():
        row["percent"] = 100.0 * row["params"] / total
    rows["total"] = {
        "params": total,
        "trainable": sum(r["trainable"] for r in rows.values()),
        "percent": 100.0,
    }
    return rows


def format_breakdown(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table of `parameter_breakdown`'s result."""
    lines = ["| component | params | trainable | % of all |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        if row["params"] or name == "total":
            lines.append(f"| {name} | {row['params']:,} | {row['trainable']:,} | {row['percent']:.2f} |")
    return "\n".join(lines)
