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
table that is not NF4's or the dynamic map, a second-level block size other than 256. It refuses a
damaged layer too, before copying anything: each tensor's dtype and length against the shape and
blocksize of the JSON (which must parse, and match the model), absmax uint8 exactly when the nested
tensors are there, finite scales and nested_offset. The error names the file, the layer and the field.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from .linear4bit import Linear4bit, NF4Config
from .nf4 import BLOCKSIZES, DYNAMIC_MAP, NF4_LEVELS, SCALE_BLOCK, NF4State, check_scales, check_state

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
    shell, without re-quantizing. The layer takes the checkpoint's block size and double quant.

    Everything is checked before anything is copied or computed (`validate_layer`): a damaged file
    is a ValueError naming `where` (file: layer) and the field, never a wrong weight or a crash."""
    meta, double_quant = validate_layer(parts, (layer.out_features, layer.in_features), where)
    packed, state = layer_state(parts, meta, double_quant, where)
    layer.config = NF4Config(blocksize=state.blocksize, double_quant=double_quant,
                             compute_dtype=layer.config.compute_dtype)
    layer.weight = packed.clone()  # (n_bytes,)
    layer.absmax = state.absmax.clone()
    layer.absmax2 = state.absmax2.clone() if double_quant else None
    layer.offset = state.offset if double_quant else None
    layer.weight_dtype = state.dtype


# ---------------------------------------------------------------------------- validation of one layer
def validate_layer(parts: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> tuple[dict, bool]:
    """(quant_state JSON, double quant) of one layer's checkpoint tensors, all checked against the
    model's layer `shape` (out, in): presence, the JSON, which components double quant implies, the
    dtype and length of each tensor, the two tables, and finite scales."""
    absent = [component_key(c) for c in ("", "absmax", "quant_map", QUANT_STATE_KEY) if c not in parts]
    if absent:
        raise ValueError(f"{where}: the checkpoint lacks {absent} of this 4-bit layer; it is incomplete")
    meta = read_quant_state(parts[QUANT_STATE_KEY], shape, where)
    double_quant = has_double_quant(parts, meta, where)
    for component, (dtype, numel) in expected_components(shape, meta["blocksize"], double_quant).items():
        check_component(parts[component], component, dtype, numel, shape, meta["blocksize"], where)
    if not torch.equal(parts["quant_map"].reshape(-1), NF4_LEVELS):
        raise ValueError(f"{where}: weight.quant_map is not the NF4 table; minilora reads NF4 weights only")
    if double_quant and not torch.equal(parts["nested_quant_map"].reshape(-1), DYNAMIC_MAP):
        raise ValueError(f"{where}: weight.nested_quant_map is not bitsandbytes' signed dynamic map, the only "
                         "second-level table minilora reads")
    for component in ("nested_absmax",) if double_quant else ("absmax",):  # double quant's absmax: uint8 codes
        bad = int((~torch.isfinite(parts[component])).sum())
        if bad:
            raise ValueError(f"{where}: weight.{component} holds {bad} NaN or infinite scale(s); the weight cannot "
                             "be read back: the file is damaged, re-export or re-download it")
    return meta, double_quant


def component_key(component: str) -> str:
    """The checkpoint key of a component, after "<P>.": "" -> "weight", "absmax" -> "weight.absmax"."""
    return f"weight.{component}".rstrip(".")


def read_quant_state(raw: torch.Tensor, shape: tuple[int, int], where: str) -> dict:
    """The quant_state tensor (uint8 bytes of a UTF-8 JSON object) decoded and checked: quant_type
    "nf4", blocksize a power of two from 32 to 4096, shape [out, in] equal to the model's layer."""
    name = component_key(QUANT_STATE_KEY)
    if raw.dtype != torch.uint8:
        raise ValueError(f"{where}: {name} is {raw.dtype}; bitsandbytes stores it as uint8 bytes of UTF-8 JSON")
    try:
        meta = json.loads(raw.reshape(-1).numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where}: {name} is not valid UTF-8 JSON ({type(err).__name__}: {err}); the file is "
                         "damaged: re-export or re-download it") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: {name} holds a JSON {type(meta).__name__}, expected an object of quant_type, "
                         "blocksize, dtype, shape (and nested_* with double quant)")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{where}: {name}: quant_type {meta.get('quant_type')!r}; minilora reads NF4 only")
    blocksize = meta.get("blocksize")
    if not is_int(blocksize) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{where}: {name}: blocksize {blocksize!r}; minilora reads NF4 blocks of a power of two "
                         "from 32 to 4096 (bitsandbytes writes 64 by default): the file is damaged or not NF4")
    stored = meta.get("shape")
    if not (isinstance(stored, list) and len(stored) == 2 and all(is_int(d) and d > 0 for d in stored)):
        raise ValueError(f"{where}: {name}: shape {stored!r}; expected a list [out, in] of two positive integers")
    if tuple(stored) != shape:
        raise ValueError(f"{where}: the checkpoint's weight has shape {tuple(stored)}, the model's layer "
                         f"{shape}: the checkpoint belongs to another model")
    return meta


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def has_double_quant(parts: dict[str, torch.Tensor], meta: dict, where: str) -> bool:
    """Whether the layer is double-quantized, when its parts agree on it: nested_absmax and
    nested_quant_map both present, absmax uint8 codes, and the JSON's nested_blocksize (256) and
    nested_offset (a finite fp32 number); or none of these, and absmax fp32 scales."""
    nested = [c for c in ("nested_absmax", "nested_quant_map") if c in parts]
    if len(nested) == 1:
        other = ({"nested_absmax", "nested_quant_map"} - set(nested)).pop()
        raise ValueError(f"{where}: the checkpoint has {component_key(nested[0])} but not {component_key(other)}; "
                         "double quant needs both: the file is incomplete")
    double_quant, absmax = bool(nested), parts["absmax"]
    if double_quant and absmax.dtype != torch.uint8:
        raise ValueError(f"{where}: weight.absmax is {absmax.dtype} but the layer is double-quantized "
                         "(nested_absmax present): its absmax must be uint8 codes")
    if not double_quant and absmax.dtype == torch.uint8:
        raise ValueError(f"{where}: weight.absmax holds uint8 codes (double quant) but weight.nested_absmax and "
                         "weight.nested_quant_map are missing: the codes cannot be read as scales without them; "
                         "the file is incomplete")
    if not double_quant and absmax.dtype != torch.float32:
        raise ValueError(f"{where}: weight.absmax is {absmax.dtype}; without double quant it must be float32 scales")
    name, listed = component_key(QUANT_STATE_KEY), sorted(k for k in ("nested_blocksize", "nested_offset") if k in meta)
    if not double_quant:
        if listed:
            raise ValueError(f"{where}: {name} describes double quant ({', '.join(listed)}) but the checkpoint "
                             "lacks weight.nested_absmax and weight.nested_quant_map: the file is incomplete")
        return False
    if meta.get("nested_blocksize") != SCALE_BLOCK or not is_int(meta.get("nested_blocksize")):
        raise ValueError(f"{where}: {name}: nested_blocksize {meta.get('nested_blocksize', 'missing')!r}; minilora "
                         f"reads bitsandbytes' double quant, in blocks of {SCALE_BLOCK}")
    if not finite_fp32(meta.get("nested_offset")):
        raise ValueError(f"{where}: {name}: nested_offset {meta.get('nested_offset', 'missing')!r}; double quant "
                         "needs a finite fp32 number (the mean of the block scales): the file is damaged")
    return True


def finite_fp32(value) -> bool:
    """A JSON number that is finite in fp32 (JSON's NaN and Infinity, and 1e39, are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return bool(torch.isfinite(torch.tensor(float(value), dtype=torch.float32)))
    except OverflowError:  # an int beyond float's range
        return False


def expected_components(shape: tuple[int, int], blocksize: int,
                        double_quant: bool) -> dict[str, tuple[torch.dtype, int]]:
    """component -> (dtype, numel) of a (out, in) weight: n = out · in, n_blocks = ⌈n / blocksize⌉,
    n_blocks2 = ⌈n_blocks / 256⌉ (the Legend above)."""
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    table = {"": (torch.uint8, (n + 1) // 2), "absmax": (torch.uint8 if double_quant else torch.float32, n_blocks),
             "quant_map": (torch.float32, len(NF4_LEVELS))}
    if double_quant:
        table.update(nested_absmax=(torch.float32, -(-n_blocks // SCALE_BLOCK)),
                     nested_quant_map=(torch.float32, len(DYNAMIC_MAP)))
    return table


def check_component(tensor: torch.Tensor, component: str, dtype: torch.dtype, numel: int, shape: tuple[int, int],
                    blocksize: int, where: str) -> None:
    """One stored tensor has the dtype and length the layer's shape and blocksize imply."""
    if tensor.dtype != dtype:
        hint = " (minilora reads bnb_4bit_quant_storage='uint8', the default)" if component == "" else ""
        raise ValueError(f"{where}: {component_key(component)} is {tensor.dtype}, expected {dtype}{hint}")
    if tensor.numel() != numel:
        raise ValueError(f"{where}: {component_key(component)} holds {tensor.numel()} values; a {shape} weight in "
                         f"blocks of {blocksize} needs {numel}: the file is damaged or belongs to another model")


def layer_state(parts: dict[str, torch.Tensor], meta: dict, double_quant: bool,
                where: str) -> tuple[torch.Tensor, NF4State]:
    """(packed uint8 [(n+1)//2], NF4State) of a validated layer, passed through the checks every reader
    of stored weights runs (nf4_format.check_state, check_scales)."""
    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    state = NF4State(absmax=parts["absmax"].reshape(-1), shape=torch.Size(meta["shape"]),
                     dtype=dtypes.get(meta.get("dtype"), torch.float32), blocksize=int(meta["blocksize"]),
                     double_quant=double_quant,
                     absmax2=parts["nested_absmax"].reshape(-1) if double_quant else None,
                     offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32) if double_quant else None)
    packed = parts[""].reshape(-1)
    try:
        check_state(packed, state)
        check_scales(state)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return packed, state
