"""Whole models: quantize in place, report the memory, or quantize while loading from safetensors.

    report = quantize_model(model, NF4Config(), skip_modules=["lm_head"])     # in place
    model  = load_quantized("path/to/model_dir", NF4Config())               # never full precision

`load_quantized` builds the model with its linear weights on the meta device (no memory), then
reads the safetensors files one tensor at a time: a linear weight is quantized the moment it is
read and its full-precision copy dropped, anything else is copied into place. Peak memory stays
near the quantized model plus one tensor, not the full-precision model.

A checkpoint that is already 4-bit (config.json's quantization_config says bitsandbytes 4-bit, as
transformers + bitsandbytes or `minilora export --format nf4` write it) is read as it is: its NF4 codes
and scales go into Linear4bit layers unchanged, nothing is quantized again (bnb_format.py), and
the layers it kept in full precision stay so.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..roles import is_linear
from . import bnb_format
from .linear4bit import Linear4bit, NF4Config
from .safetensors_file import read_header, read_safetensors


@dataclass
class MemoryReport:
    """What quantization did to a model's linear weights."""

    modules: int  # Linear4bit layers
    weights: int  # quantized weight values
    bytes_before: int  # those weights in their original dtype
    bytes_after: int  # packed codes + block scales
    bits_per_weight: float  # 8 · bytes_after / weights

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_saved": self.bytes_saved}


def memory_report(model: nn.Module) -> MemoryReport:
    """Bits per weight and bytes saved over every Linear4bit in `model`."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    weights = sum(m.in_features * m.out_features for m in layers)
    before = sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in layers)
    after = sum(m.weight.numel() + m.state.nbytes() for m in layers)
    return MemoryReport(len(layers), weights, before, after, 8 * after / weights if weights else 0.0)


def _skipped(name: str, skip_modules) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip_modules)


def _targets(model: nn.Module, skip_modules) -> list[str]:
    """Paths of the Linear / Conv1D layers to quantize: all but the output head, `skip_modules`, and
    the modules the model class keeps in fp32 (`_keep_in_fp32_modules`, e.g. T5's `wo`, whose input
    T5 casts to the weight's dtype: a packed uint8 weight would turn activations into bytes)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip_modules = list(skip_modules) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [
        name for name, m in model.named_modules()
        if is_linear(m) and not isinstance(m, Linear4bit) and m is not head and not _skipped(name, skip_modules)
        and not name.split(".")[-1].startswith("lora_")
    ]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, config: NF4Config = NF4Config(), skip_modules: Optional[list[str]] = None) -> MemoryReport:
    """Replace every Linear / Conv1D (but the LM head and `skip_modules`) by a Linear4bit, in place."""
    skip_modules = list(skip_modules or [])
    for name in _targets(model, skip_modules):
        module = model.get_submodule(name)
        try:
            _set(model, name, Linear4bit.from_float(module, config))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return memory_report(model)


# ---------------------------------------------------------------------------- quantize while loading
@contextlib.contextmanager
def _linear_weights_on_meta():
    """While building a model, nn.Linear and Conv1D allocate their weights on the meta device."""
    from transformers.pytorch_utils import Conv1D

    originals = {cls: cls.__init__ for cls in (nn.Linear, Conv1D)}

    def on_meta(original):
        def init(self, *args, **kwargs):
            with torch.device("meta"):
                original(self, *args, **kwargs)
        return init

    for cls, original in originals.items():
        cls.__init__ = on_meta(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__init__ = original


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_quantized(path: Union[str, Path], config: NF4Config = NF4Config(), skip_modules: Optional[list[str]] = None,
                   model_class=None) -> nn.Module:
    """A Hugging Face model from a local directory (config.json + safetensors, sharded or not),
    its linear layers quantized to NF4 tensor by tensor as they are read. The class is the one
    config.json's `architectures` names (a causal-LM checkpoint loads with its head), unless
    `model_class` (a transformers class or Auto class) says otherwise."""
    from transformers import AutoConfig

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} is missing: load_quantized needs a model directory")
    hf_config = AutoConfig.from_pretrained(directory)
    prequantized = bnb_format.is_prequantized(json.loads((directory / "config.json").read_text()))
    model_class = model_class or architecture_class(hf_config)
    with _linear_weights_on_meta():
        model = (model_class.from_config(hf_config) if hasattr(model_class, "from_config") else model_class(hf_config))
    model.eval()
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    prefixes = _key_prefixes(model)
    if prequantized:  # the layers the checkpoint holds in 4 bits, and no others
        keys = [entry[0] for shard in _shards(path) for entry in read_header(shard)[1]]
        quantized = [_resolve(k, names, set(), prefixes) for k in bnb_format.quantized_weight_keys(keys)]
        targets = {name.rpartition(".")[0] for name in quantized if name is not None}
    else:
        targets = set(_targets(model, list(skip_modules or [])))
    for name in targets:  # empty NF4 shells, filled as their weights arrive
        module = model.get_submodule(name)
        conv1d = not isinstance(module, nn.Linear)
        d_in, d_out = (module.weight.shape if conv1d else module.weight.shape[::-1])
        _set(model, name, Linear4bit(d_in, d_out, bias=module.bias is not None, config=config, from_conv1d=conv1d,
                                     device="meta"))
    stored = {}  # prequantized layer -> {component: tensor}, "" for the packed codes
    for shard in _shards(path):
        for key, tensor in read_safetensors(shard):  # the only full-precision tensor alive
            key, component = bnb_format.split_key(key) if prequantized else (key, None)
            name = _resolve(key, names, targets, prefixes)
            if name is None:
                continue
            owner, _, leaf = name.rpartition(".")
            if prequantized and owner in targets and leaf == "weight":
                stored.setdefault(owner, {})[component or ""] = tensor.clone()
            elif owner in targets and leaf == "weight":
                layer = model.get_submodule(owner)
                layer.set_weight(tensor.t() if layer.from_conv1d else tensor)
            else:
                _assign(model, name, tensor)
            del tensor
    for owner in sorted(targets) if prequantized else []:
        bnb_format.fill_layer(model.get_submodule(owner), stored.get(owner, {}), f"{path}: {owner}")
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: no tensor for {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return model.requires_grad_(False)


def architecture_class(hf_config) -> type:
    """The transformers class that a config's `architectures` names (what `save_pretrained` wrote:
    "GPT2LMHeadModel", "LlamaForCausalLM", "BertModel"), or AutoModel (no head) when it names none
    that this transformers release has."""
    import transformers

    for name in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _key_prefixes(model: nn.Module) -> list[str]:
    """Checkpoint keys may carry the base-model prefix ("bert.", "transformer.") or not."""
    prefix = getattr(model, "base_model_prefix", "")
    return ["", f"{prefix}."] if prefix else [""]


def _resolve(key: str, names: set, targets: set, prefixes: list[str]) -> Optional[str]:
    for p in prefixes:
        for candidate in (key, p + key, key.removeprefix(p)):
            if candidate in names or candidate.rpartition(".")[0] in targets:
                return candidate
    return None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    current = getattr(module, leaf)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: the checkpoint has shape {tuple(tensor.shape)}, the model {tuple(current.shape)}")
    if not current.is_meta:  # in place: weights tied to this one (the LM head) stay tied
        with torch.no_grad():
            current.copy_(tensor)
        return
    tensor = tensor.to(current.dtype, copy=True)  # own memory: the reader reuses its buffer
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor
