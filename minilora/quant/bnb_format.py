r"""bitsandbytes' serialized 4-bit format, both ways: the tensors a Linear4bit becomes in a
transformers + bitsandbytes checkpoint, and back.

minilora's NF4 bytes are bitsandbytes' bytes (nf4.py), so a layer `P` is a renaming:

    P.weight                                   uint8 [(n + 1) // 2, 1]   packed codes, row-major (out, in)
    P.weight.absmax                            uint8 [n_blocks]           scale codes (double quant), or
                                               fp32  [n_blocks]           the scales themselves (without)
    P.weight.quant_map                         fp32  [16]                 the NF4 levels
    P.weight.nested_absmax                     fp32  [n_blocks2]          scales of the scales (double quant)
    P.weight.nested_quant_map                  fp32  [256]                bitsandbytes' signed dynamic map
    P.weight.quant_state.bitsandbytes__nf4     uint8 [len(json)]          UTF-8 JSON: quant_type, blocksize,
                                               dtype, shape, nested_blocksize, nested_dtype, nested_offset
    P.bias                                     as in the model

GPT-2's Conv1D is stored as bitsandbytes stores it: transposed to (out, in) before packing, which
is also how Linear4bit keeps it. config.json carries the `quantization_config` that transformers
writes for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...).

Reading refuses what minilora's kernels cannot compute bit for bit: another quant type (fp4), a
table that is not NF4's or the dynamic map, a second-level block size other than 256.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from .linear4bit import Linear4bit, NF4Config
from .nf4 import DYNAMIC_MAP, NF4_LEVELS, SCALE_BLOCK

# Legend: n = out · in weights of a layer; n_blocks = ⌈n / blocksize⌉; n_blocks2 = ⌈n_blocks / 256⌉.

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
COMPONENTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY)  # after "<P>.weight."
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def layer_tensors(prefix: str, layer: Linear4bit) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one Linear4bit under module path `prefix` (bias included)."""
    state = layer.state
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": DTYPE_NAMES[state.dtype],
            "shape": list(state.shape)}
    out = {f"{prefix}.weight": layer.packed.clone().reshape(-1, 1),  # (n_bytes, 1), bitsandbytes' layout
           f"{prefix}.weight.absmax": state.absmax.clone(),
           f"{prefix}.weight.quant_map": NF4_LEVELS.clone()}
    if state.double_quant:
        meta.update(nested_blocksize=SCALE_BLOCK, nested_dtype="float32", nested_offset=float(state.offset))
        out[f"{prefix}.weight.nested_absmax"] = state.absmax2.clone()
        out[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_MAP.clone()
    out[f"{prefix}.weight.{QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach().clone()
    return out


def quantization_config(double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str]) -> dict:
    """The `quantization_config` entry of config.json, as transformers writes it for bitsandbytes 4-bit."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype], "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules or None, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def is_prequantized(config_dict: dict) -> bool:
    """True for a config.json whose quantization_config says bitsandbytes 4-bit."""
    q = config_dict.get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def split_key(key: str) -> tuple[str, Optional[str]]:
    """"P.weight.absmax" -> ("P.weight", "absmax"); a key of no quantized component -> (key, None)."""
    for component in COMPONENTS:
        if key.endswith(".weight." + component):
            return key[: -len(component) - 1], component
    return key, None


def quantized_weight_keys(keys) -> set[str]:
    """The "P.weight" keys that have a 4-bit quant state among `keys`; other quant types refused."""
    found = set()
    for key in keys:
        if ".weight.quant_state.bitsandbytes__" in key:
            weight_key, _, kind = key.partition(".quant_state.bitsandbytes__")
            if kind != "nf4":
                raise ValueError(f"{key}: a bitsandbytes {kind!r} weight; minilora reads NF4 only. Load it with "
                                 "transformers, or re-save it with bnb_4bit_quant_type='nf4'")
            found.add(weight_key)
    return found


def fill_layer(layer: Linear4bit, parts: dict[str, torch.Tensor], where: str) -> None:
    """Put one layer's checkpoint tensors (component -> tensor, "" for the packed codes) into a Linear4bit
    shell, without re-quantizing. The layer takes the checkpoint's block size and double quant."""
    absent = [f"weight.{c}".rstrip(".") for c in ("", "absmax", "quant_map", QUANT_STATE_KEY) if c not in parts]
    if absent:
        raise ValueError(f"{where}: the checkpoint lacks {absent} of this 4-bit layer; it is incomplete")
    meta = json.loads(bytes(parts[QUANT_STATE_KEY].numpy().tobytes()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{where}: quant_type {meta.get('quant_type')!r}; minilora reads NF4 only")
    shape = (layer.out_features, layer.in_features)
    if tuple(meta["shape"]) != shape:
        raise ValueError(f"{where}: the checkpoint's weight has shape {tuple(meta['shape'])}, the model's layer "
                         f"{shape}: the checkpoint belongs to another model")
    if not torch.equal(parts["quant_map"].float(), NF4_LEVELS):
        raise ValueError(f"{where}: quant_map is not the NF4 table; minilora reads NF4 weights only")
    double_quant = "nested_absmax" in parts
    if double_quant:
        if meta.get("nested_blocksize") != SCALE_BLOCK or not torch.equal(parts["nested_quant_map"].float(), DYNAMIC_MAP):
            raise ValueError(f"{where}: double quant with nested_blocksize {meta.get('nested_blocksize')} and its own "
                             f"map; minilora reads bitsandbytes' dynamic map in blocks of {SCALE_BLOCK}")
    n = shape[0] * shape[1]
    packed = parts[""].reshape(-1)
    n_blocks = -(-n // meta["blocksize"])
    if packed.numel() != (n + 1) // 2 or parts["absmax"].numel() != n_blocks:
        raise ValueError(f"{where}: {packed.numel()} code bytes and {parts['absmax'].numel()} scales; a {shape} weight "
                         f"in blocks of {meta['blocksize']} needs {(n + 1) // 2} and {n_blocks}")
    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    layer.config = NF4Config(blocksize=int(meta["blocksize"]), double_quant=double_quant,
                             compute_dtype=layer.config.compute_dtype)
    layer.weight = packed.to(torch.uint8).clone()  # (n_bytes,)
    layer.absmax = parts["absmax"].to(torch.uint8 if double_quant else torch.float32).clone()
    layer.absmax2 = parts["nested_absmax"].float().clone() if double_quant else None
    layer.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32) if double_quant else None
    layer.weight_dtype = dtypes.get(meta.get("dtype"), torch.float32)
