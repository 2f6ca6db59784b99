"""Which module is q, k, v, o, up, down or gate, in each model family, and at which depth.

`classify(model)` walks a Hugging Face model once and returns a `Site` for every Linear or
GPT-2 Conv1D: its role, its layer index, its stack (encoder/decoder) and whether it is self- or
cross-attention. Fused projections (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`, Phi-3's
`qkv_proj` and `gate_up_proj`, ...) carry their parts, so LoRA can cover single slices of them.
A part is the set of output rows the model's own attention code reads as q (or k, v, gate, up),
found from the family's layout (families.py) and the model's config, never from shapes alone:

    GPT-2 c_attn:            [ q (d) | k (d) | v (d) ]                       parts: one block each
    GPT-NeoX query_key_value: [ q_0 k_0 v_0 | q_1 k_1 v_1 | ... ]  (H blocks)  q = rows [0, dh) of each

Role selectors in `target_modules` are: q k v o up down gate ffn, each optionally narrowed by
`self_` / `cross_` (attention kind) and `encoder.` / `decoder.` (stack), e.g. "decoder.cross_v".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .families import BERT, FAMILIES, LLAMA, MODEL_TYPES

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("up", "down", "gate")
ROLES = ATTENTION_ROLES + FFN_ROLES
_CROSS_MARKERS = ("EncDecAttention", "encoder_attn", "crossattention")


def part_rows(t: torch.Tensor, first: int, end: int, blocks: int, dim: int = -1) -> torch.Tensor:
    """A view (never a copy) of the rows of `t` along `dim` that rows [first, end) of each of
    `blocks` equal blocks make: `t` (..., d, ...) -> (..., blocks, end - first, ...).

        blocks = 1:  t[..., first:end]                        contiguous (GPT-2 c_attn's q)
        blocks = H:  t.view(..., H, d / H)[..., first:end]    per head (GPT-NeoX: q of head h is
                                                               rows h·3dh + [0, dh))"""
    dim = dim % t.dim()
    return t.unflatten(dim, (blocks, -1)).narrow(dim + 1, first, end - first)


class Rows:
    """What a part covers: rows [first, end) of each of `blocks` equal blocks of a layer's output.
    Shared by `Part` (what the model's code calls q) and `lora.LoraPart` (an adapter over it)."""

    first: int
    end: int
    blocks: int

    @property
    def width(self) -> int:
        """How many output rows the part covers."""
        return (self.end - self.first) * self.blocks

    def rows(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The part's rows of `t` along `dim`, a view shaped (blocks, end - first) there."""
        return part_rows(t, self.first, self.end, self.blocks, dim)

    def same_rows(self, other: "Rows") -> bool:
        return (self.first, self.end, self.blocks) == (other.first, other.end, other.blocks)


@dataclass(frozen=True)
class Part(Rows):
    """A named set of a layer's output rows: "q" of GPT-2's fused c_attn ([0, 768), one block),
    "q" of GPT-NeoX's query_key_value (rows [0, dh) of each of H blocks of 3·dh), or FULL, every
    row. The word "part" means this everywhere in minilora."""

    name: str
    first: int  # first row of the part inside each block
    end: int  # one past its last row inside each block
    blocks: int = 1  # the output cut into this many equal blocks (heads, kv groups); 1: contiguous


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
    layout: Optional[str] = None  # a fused layer's layout (families.py), else None
    layout_problem: Optional[str] = None  # why the config does not determine a fused layer's parts, else None
    is_parameter: bool = False  # a 3-D parameter (mixture-of-experts weights, experts.py), not a module

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


def name_matches(name: str, key: str) -> bool:
    """PEFT's rule for a name in a list (target_modules, modules_to_save): the exact path, or a
    suffix after a dot."""
    return name == key or name.endswith("." + key)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at path `name` in `model`, replacing what was there."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def rules_of(model: nn.Module) -> list[tuple[str, str, Optional[str]]]:
    """The role table of `model`'s family; for a family minilora does not know, the common names
    (LLaMA's and BERT's), nothing fused."""
    family = family_of(model)
    if family in FAMILIES:
        return FAMILIES[family]
    return [(pattern, role, None) for pattern, role, layout in LLAMA + BERT if layout is None]


def role_of(name: str, rules) -> tuple[Optional[str], Optional[str]]:
    """(role, fused layout) of the module or parameter at path `name`; later rules are more
    specific (wi_0 after wi)."""
    found = (None, None)
    for pattern, role, layout in rules:
        if re.search(rf"(?:^|\.){pattern}$", name):
            found = (role, layout)
    return found


def classify(model: nn.Module, layers_pattern=None, modules=None) -> dict[str, Site]:
    """A Site for every Linear / Conv1D in `model`, keyed by module path. `modules`: the (path,
    module) pairs of one `walk(model)`, when the caller has walked it already."""
    rules = rules_of(model)
    config = getattr(model, "config", None)
    sites = {}
    for name, module in (walk(model) if modules is None else modules):
        if hasattr(module, "original_module"):  # a trained copy (modules_to_save): never a target
            continue
        if not hasattr(module, "base_layer") and not is_linear(module):  # a LoRA wrapper is a site
            continue
        if getattr(module, "HOLDS_EXPERT_WEIGHTS", False):  # experts.LoraExperts: its sites are parameters
            continue
        role, layout = role_of(name, rules)
        sites[name] = make_site(name, role, layout, features(module)[1], config, layers_pattern)
    return sites


def parameter_sites(model: nn.Module, layers_pattern=None, modules=None) -> dict[str, Site]:
    """A Site for every 3-D parameter in `model` (stacked expert weights, (E, d_out, d_in), or
    (E, d_in, d_out) where the experts module says `is_transposed`), keyed by parameter path.
    Its out_features are one expert's output rows. `modules`: as for `classify`."""
    rules = rules_of(model)
    config = getattr(model, "config", None)
    sites = {}
    for name, module in (walk(model) if modules is None else modules):
        if hasattr(module, "original_module"):
            continue
        owner = getattr(module, "base_layer", module)  # an adapted experts module: its base's parameters
        if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # a kernel, not stacked experts
            continue
        for parameter, value in owner.named_parameters(recurse=False):
            if value.dim() != 3:
                continue
            path = f"{name}.{parameter}" if name else parameter
            role, layout = role_of(path, rules)
            d_out = value.shape[2] if getattr(owner, "is_transposed", False) else value.shape[1]
            site = make_site(path, role, layout, d_out, config, layers_pattern)
            sites[path] = replace(site, is_parameter=True)
    return sites


def make_site(name: str, role: Optional[str], layout: Optional[str], out_features: int, config,
              layers_pattern=None) -> Site:
    """The Site of one layer (or 3-D parameter) at path `name` with `out_features` output rows."""
    parts, problem = None, None
    if role and "_" in role:
        try:
            parts = fused_parts(role, layout, out_features, config)
        except LayoutError as err:
            problem = f"{name}: {err}"
    attention = None
    if role and (role in ATTENTION_ROLES or role == "q_k_v"):
        attention = "cross" if any(m in name for m in _CROSS_MARKERS) else "self"
    stack = None
    if getattr(config, "is_encoder_decoder", False):
        stack = "decoder" if "decoder." in name else "encoder" if "encoder." in name else None
    return Site(name, role, parts, out_features, layer_index(name, layers_pattern), stack, attention, layout, problem)


# ---------------------------------------------------------------------------- fused layouts
class LayoutError(ValueError):
    """A fused layer's parts cannot be read from the model's config."""


def _fields(config, *names: str) -> list:
    """The config's values for `names`; a LayoutError naming every one that is missing (or None)."""
    values = [getattr(config, n, None) for n in names]
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise LayoutError(
            f"the model config ({type(config).__name__}) lacks {', '.join(missing)}, which decide(s) where q, k and v "
            "sit in this fused layer; set them in the config, or target the layer whole by its module name"
        )
    return values


def _head_dim(config) -> int:
    heads, hidden = _fields(config, "num_attention_heads", "hidden_size")
    return getattr(config, "head_dim", None) or hidden // heads


def _contiguous(names, sizes, d_out: int) -> tuple[Part, ...]:
    """[ a | b | c ] one after the other: one block."""
    if sum(sizes) != d_out:
        raise LayoutError(f"the config gives part sizes {dict(zip(names, sizes))}, summing to {sum(sizes)}, but the "
                          f"layer has {d_out} output rows; the config does not describe this layer")
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return tuple(Part(name, end - size, end) for name, size, end in zip(names, sizes, ends))


def _blocked(names, sizes, blocks: int, d_out: int) -> tuple[Part, ...]:
    """[ a b c | a b c | ... ]: `blocks` equal blocks, each holding the parts one after the other."""
    if blocks * sum(sizes) != d_out:
        raise LayoutError(f"the config gives {blocks} blocks of {dict(zip(names, sizes))} = {blocks * sum(sizes)} rows, "
                          f"but the layer has {d_out}; the config does not describe this layer")
    return tuple(Part(p.name, p.first, p.end, blocks) for p in _contiguous(names, sizes, sum(sizes)))


def _gqa(names, d_out: int, config, kv_heads=None) -> tuple[Part, ...]:
    """[ q (heads·dh) | k (kv·dh) | v (kv·dh) ]: Phi-3, MPT, ModernBERT, GPT-2; multi-query: kv = 1."""
    (heads,) = _fields(config, "num_attention_heads")
    kv = kv_heads or getattr(config, "num_key_value_heads", None) or heads  # no kv field: every head has its own
    dh = _head_dim(config)
    return _contiguous(names, (heads * dh, kv * dh, kv * dh), d_out)


def _per_head(names, d_out: int, config) -> tuple[Part, ...]:
    """[ q_h k_h v_h ] for each head h: GPT-NeoX, Bloom, Falcon (old), GPT-BigCode (multi-head)."""
    (heads,) = _fields(config, "num_attention_heads")
    dh = _head_dim(config)
    return _blocked(names, (dh, dh, dh), heads, d_out)


def _kv_group(names, d_out: int, config) -> tuple[Part, ...]:
    """[ q × heads/kv, k, v ] for each kv head: Falcon's new decoder architecture."""
    heads, kv = _fields(config, "num_attention_heads", "num_kv_heads")
    dh = _head_dim(config)
    return _blocked(names, (heads // kv * dh, dh, dh), kv, d_out)


def _falcon(names, d_out: int, config) -> tuple[Part, ...]:
    new, multi_query = _fields(config, "new_decoder_architecture", "multi_query")
    if new:
        return _kv_group(names, d_out, config)
    return _gqa(names, d_out, config, kv_heads=1) if multi_query else _per_head(names, d_out, config)


def _bigcode(names, d_out: int, config) -> tuple[Part, ...]:
    (multi_query,) = _fields(config, "multi_query")
    return _gqa(names, d_out, config, kv_heads=1) if multi_query else _per_head(names, d_out, config)


def _linear_qkv(names, d_out: int, config) -> tuple[Part, ...]:
    """Qwen3.5's linear attention: [ q (kh·kd) | k (kh·kd) | v (vh·vd) ]."""
    kh, kd, vh, vd = _fields(config, "linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads",
                             "linear_value_head_dim")
    return _contiguous(names, (kh * kd, kh * kd, vh * vd), d_out)


def _halves(names, d_out: int, config) -> tuple[Part, ...]:
    """[ gate | up ]: the model's code chunks the output in two equal halves."""
    return _contiguous(names, (d_out // 2, d_out - d_out // 2), d_out)


def _interleaved(names, d_out: int, config) -> tuple[Part, ...]:
    """[ gate_0 up_0 gate_1 up_1 ... ]: GPT-OSS's experts read gate = out[..., ::2], up = out[..., 1::2]."""
    return _blocked(names, (1, 1), d_out // 2, d_out)


LAYOUTS = {"contiguous": _gqa, "per_head": _per_head, "kv_group": _kv_group, "falcon": _falcon,
           "bigcode": _bigcode, "linear_qkv": _linear_qkv, "halves": _halves, "interleaved": _interleaved}


def fused_parts(role: str, layout: Optional[str], d_out: int, config) -> tuple[Part, ...]:
    """A fused layer's parts, in output order, from its layout and the model's config."""
    if layout not in LAYOUTS:
        raise LayoutError(f"fused role {role!r} has no layout in the role table")
    if config is None:
        raise LayoutError("the model has no config, which decides where its fused parts sit")
    return LAYOUTS[layout](tuple(role.split("_")), d_out, config)


def supported_roles(model: nn.Module, sites=None) -> list[str]:
    """The base roles this model actually has, for error messages; from `sites` (classify's and
    parameter_sites') when the caller has them."""
    if sites is None:
        sites = [*classify(model).values(), *parameter_sites(model).values()]
    found = set()
    for site in sites:
        if site.role:
            found.update(site.role.split("_"))  # a fused role names its parts
    return [r for r in ROLES if r in found]


def by_part(modules: dict[str, nn.Module]) -> nn.Module:
    """How an adapter table holds one adapter's modules: a whole-layer adapter's one module as it
    is (PEFT's `lora_A.<adapter>.weight`), a sliced adapter's as a ModuleDict of its parts."""
    return modules[FULL] if list(modules) == [FULL] else nn.ModuleDict(modules)


def part_of(held: nn.Module, part: str) -> nn.Module:
    """The module of `part` in what `by_part` stored."""
    if isinstance(held, nn.ModuleDict):
        return held[part]
    if part != FULL:
        raise KeyError(f"part {part!r}: this adapter covers the whole layer (part {FULL!r})")
    return held

