"""Which module is q, k, v, o, up, down or gate, in each model family, and at which depth.

`classify(model)` walks a Hugging Face model once and returns a `Site` for every Linear or
GPT-2 Conv1D: its role, its layer index, its stack (encoder/decoder) and whether it is self- or
cross-attention. Fused projections (GPT-2's `c_attn`, Phi-3's `qkv_proj` and `gate_up_proj`)
carry the sizes of their parts, so LoRA can cover single slices of them:

    c_attn: x (B, T, d) -> [ q (B, T, d) | k (B, T, d) | v (B, T, d) ]      parts: q, k, v

Role selectors in `target_modules` are: q k v o up down gate ffn, each optionally narrowed by
`self_` / `cross_` (attention kind) and `encoder.` / `decoder.` (stack), e.g. "decoder.cross_v".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch.nn as nn

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("up", "down", "gate")
ROLES = ATTENTION_ROLES + FFN_ROLES

# (regex searched at the end of the module path, role). A fused role names its parts with "_".
_GPT2 = [
    (r"attn\.c_attn", "q_k_v"),
    (r"attn\.c_proj", "o"),
    (r"mlp\.c_fc", "up"),
    (r"mlp\.c_proj", "down"),
]
_LLAMA = [
    (r"self_attn\.q_proj", "q"),
    (r"self_attn\.k_proj", "k"),
    (r"self_attn\.v_proj", "v"),
    (r"self_attn\.o_proj", "o"),
    (r"self_attn\.qkv_proj", "q_k_v"),
    (r"mlp\.gate_proj", "gate"),
    (r"mlp\.up_proj", "up"),
    (r"mlp\.down_proj", "down"),
    (r"mlp\.gate_up_proj", "gate_up"),
]
_BERT = [
    (r"attention\.self\.query", "q"),
    (r"attention\.self\.key", "k"),
    (r"attention\.self\.value", "v"),
    (r"attention\.output\.dense", "o"),
    (r"intermediate\.dense", "up"),
    (r"\d+\.output\.dense", "down"),
]
_T5 = [
    (r"(?:Self|EncDec)Attention\.q", "q"),
    (r"(?:Self|EncDec)Attention\.k", "k"),
    (r"(?:Self|EncDec)Attention\.v", "v"),
    (r"(?:Self|EncDec)Attention\.o", "o"),
    (r"DenseReluDense\.wi", "up"),
    (r"DenseReluDense\.wi_0", "gate"),
    (r"DenseReluDense\.wi_1", "up"),
    (r"DenseReluDense\.wo", "down"),
]
_BART = [
    (r"(?:self|encoder)_attn\.q_proj", "q"),
    (r"(?:self|encoder)_attn\.k_proj", "k"),
    (r"(?:self|encoder)_attn\.v_proj", "v"),
    (r"(?:self|encoder)_attn\.out_proj", "o"),
    (r"fc1", "up"),
    (r"fc2", "down"),
]

FAMILIES = {"gpt2": _GPT2, "llama": _LLAMA, "bert": _BERT, "t5": _T5, "bart": _BART}
MODEL_TYPES = {
    "gpt2": "gpt2",
    **{t: "llama" for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")},
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: "t5" for t in ("t5", "mt5", "umt5")},
    **{t: "bart" for t in ("bart", "mbart", "marian", "pegasus", "blenderbot")},
}
_CROSS_MARKERS = ("EncDecAttention", "encoder_attn", "crossattention")


@dataclass(frozen=True)
class Part:
    """A named set of a layer's output columns, [first, end): "q" of GPT-2's fused c_attn, or
    FULL, every column. The word "part" means this everywhere in minilora."""

    name: str
    first: int
    end: int


FULL = "full"  # the name of the part that covers every output column of a layer


@dataclass(frozen=True)
class Site:
    """What one Linear / Conv1D is in its model."""

    name: str  # module path, e.g. "transformer.h.3.attn.c_attn"
    role: Optional[str]  # q k v o up down gate, a fused "q_k_v" / "gate_up", or None if unknown
    parts: Optional[tuple[Part, ...]]  # a fused layer's outputs in order: q [0, 768), k [768, 1536), ...
    out_features: int  # the layer's output columns (every part lies inside [0, out_features))
    layer: Optional[int]  # index in the layer list, None outside it (lm_head, pooler)
    stack: Optional[str]  # "encoder" / "decoder" in encoder-decoder models, else None
    attention: Optional[str]  # "self" / "cross" for attention projections, else None

    @property
    def component(self) -> Optional[str]:
        """encoder_self / decoder_self / cross, for `component_ranks`."""
        if self.attention == "cross":
            return "cross"
        if self.attention == "self" and self.stack is not None:
            return f"{self.stack}_self"
        return None


@dataclass(frozen=True)
class Selector:
    """A parsed role selector such as "decoder.cross_v" or "ffn"."""

    roles: tuple[str, ...]  # base roles it covers
    attention: Optional[str]  # "self" / "cross" / None (both)
    stack: Optional[str]  # "encoder" / "decoder" / None (both)

    def matches(self, site: Site, role: str) -> bool:
        return (
            role in self.roles
            and (self.attention is None or site.attention == self.attention)
            and (self.stack is None or site.stack == self.stack)
        )


def parse_selector(text: str) -> Optional[Selector]:
    """A role selector, or None if `text` is not one (then it is a module name)."""
    stack = None
    for prefix in ("encoder.", "decoder."):
        if text.startswith(prefix):
            stack, text = prefix[:-1], text[len(prefix):]
    attention = None
    for prefix in ("self_", "cross_"):
        if text.startswith(prefix):
            attention, text = prefix[:-1], text[len(prefix):]
    if text == "ffn" and attention is None:
        return Selector(FFN_ROLES, None, stack)
    if text in ATTENTION_ROLES or (text in FFN_ROLES and attention is None):
        return Selector((text,), attention, stack)
    return None


def family_of(model: nn.Module) -> Optional[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return MODEL_TYPES.get(model_type)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' GPT-2 Conv1D (a Linear whose weight is stored (in, out)), or a
    quantized linear layer (marked LINEAR_LIKE)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or getattr(module, "LINEAR_LIKE", False)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features  # nn.Linear and quantized Linears
    d_in, d_out = module.weight.shape  # Conv1D stores (in, out)
    return d_in, d_out


def layer_index(name: str, layers_pattern=None) -> Optional[int]:
    """The first integer path component (h.3, layers.3, block.3), or after `layers_pattern`."""
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = re.search(rf"(?:^|\.)(?:{'|'.join(map(re.escape, patterns))})\.(\d+)(?:\.|$)", name)
    else:
        match = re.search(r"\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that does not descend into adapter wrappers (a LoRA layer, a trained copy):
    the wrapper itself is yielded, its internals are not. Its cost does not grow with the number
    of adapters."""
    yield prefix, module
    if hasattr(module, "base_layer") or hasattr(module, "original_module"):
        return
    for name, child in module.named_children():
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def classify(model: nn.Module, layers_pattern=None) -> dict[str, Site]:
    """A Site for every Linear / Conv1D in `model`, keyed by module path."""
    family = family_of(model)
    rules = FAMILIES.get(family, _LLAMA + _BERT)  # unknown family: the common names, nothing fused
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    sites = {}
    for name, module in walk(model):
        if hasattr(module, "original_module"):  # a trained copy (modules_to_save): never a target
            continue
        if not hasattr(module, "base_layer") and not is_linear(module):  # a LoRA wrapper is a site
            continue
        role = None
        for pattern, candidate in rules:
            if re.search(rf"(?:^|\.){pattern}$", name):
                role = candidate  # later rules are more specific (wi_0 after wi)
        out_features = features(module)[1]
        parts = _fused_parts(role, out_features, config) if role and "_" in role else None
        if role and "_" in role and parts is None:
            role = None  # a fused layer whose split we cannot know is not sliced
        attention = None
        if role and (role in ATTENTION_ROLES or role == "q_k_v"):
            attention = "cross" if any(m in name for m in _CROSS_MARKERS) else "self"
        stack = None
        if encoder_decoder:
            stack = "decoder" if "decoder." in name else "encoder" if "encoder." in name else None
        sites[name] = Site(name, role, parts, out_features, layer_index(name, layers_pattern), stack, attention)
    return sites


def _fused_parts(role: str, d_out: int, config) -> Optional[tuple[Part, ...]]:
    """A fused projection's parts, in output order, from the model config."""
    sizes = _fused_sizes(role, d_out, config)
    if sizes is None:
        return None
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return tuple(Part(name, end - size, end) for name, size, end in zip(role.split("_"), sizes, ends))


def _fused_sizes(role: str, d_out: int, config) -> Optional[tuple[int, ...]]:
    """Output sizes of a fused projection's parts, from the model config."""
    names = role.split("_")
    if role == "q_k_v":
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads:
            head_dim = getattr(config, "head_dim", None) or (d_out // (heads + 2 * kv_heads))
            sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
            if sum(sizes) == d_out:
                return sizes
    if d_out % len(names) == 0:
        return (d_out // len(names),) * len(names)
    return None


def supported_roles(model: nn.Module) -> list[str]:
    """The base roles this model actually has, for error messages."""
    found = set()
    for site in classify(model).values():
        if site.parts:
            found.update(part.name for part in site.parts)
        elif site.role:
            found.add(site.role)
    return [r for r in ROLES if r in found]
