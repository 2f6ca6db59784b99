"""A damaged 4-bit checkpoint is refused, never computed: a ValueError naming the file, the layer and
the field, not a crash and not wrong logits. The native CPU functions check their own bounds, the
torch reference refuses the same states, and the double-quant bytes are bitsandbytes' exactly where
bitsandbytes' arithmetic is finite (and, by choice, not where it overflows).

The checkpoint is minilora's own export of a one-layer LLaMA (hidden 256, intermediate 512) in
bitsandbytes' format. Its q_proj has 256 × 256 = 65,536 weights, the native path's threshold: 1,024
blocks of 64, whose scale codes form 4 groups of 256 (nested_absmax holds 4 values). Loading runs in
a subprocess (this file, run as a script), so a segmentation fault fails the tests instead of
killing pytest; it loads every case in one process and reports each as one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora as ml
from minilora.kernels import native
from minilora.quant.bnb_format import QUANT_STATE_KEY
from minilora.quant.nf4 import (
    DYNAMIC_MAP, NF4_BOUNDS, NF4_LEVELS, SCALE_BLOCK, NF4State, nf4_dequantize, nf4_quantize, quantize_scales,
)

LAYER = "model.layers.0.self_attn.q_proj"  # 65,536 weights: 1,024 blocks, 4 scale groups
IDS = [[5, 17, 99, 3, 42, 7, 64, 120, 11, 8, 30, 77]]
OVERFLOW = 2.0**-128  # the largest absmax2 whose fp32 reciprocal is inf (≈ 2.938736e-39)
TINIEST = 2.0**-149  # the smallest subnormal fp32


def largest_scale_step() -> float:
    """The most a double-quant code's read-back can miss its centred scale, per unit of absmax2: over
    the codes' cells (encoded with entry 0 at -1.0, decoded with bitsandbytes' -0.99297), the farthest
    cell edge from the decoded value. 0.0105, at code 1's lower edge."""
    encoded = torch.cat([torch.tensor([-1.0]), DYNAMIC_MAP[1:]])  # code 0's cell is encoded as if it were -1.0
    edges = torch.cat([torch.tensor([-1.0]), (encoded[:-1] + encoded[1:]) / 2, torch.tensor([1.0])])  # (257,)
    return float(torch.maximum(DYNAMIC_MAP - edges[:-1], edges[1:] - DYNAMIC_MAP).max())


STEP = largest_scale_step()


# ---------------------------------------------------------------------------- damage, one layer at a time
def edit_meta(change):
    """A damage that rewrites the layer's quant_state JSON: change(meta) edits the dict in place."""
    def damage(tensors, key):
        meta = json.loads(bytes(tensors[f"{key}.{QUANT_STATE_KEY}"].tolist()))
        change(meta)
        tensors[f"{key}.{QUANT_STATE_KEY}"] = json_bytes(json.dumps(meta))
    return damage


def json_bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def tensor_key(key, component):
    """"<P>.weight" + "absmax" -> "<P>.weight.absmax"; the packed codes ("") are "<P>.weight" itself."""
    return f"{key}.{component}" if component else key


def set_item(component, index, value):
    def damage(tensors, key):
        tensors[f"{key}.{component}"][index] = value
    return damage


def truncate(component, keep):
    def damage(tensors, key):
        tensors[f"{key}.{component}"] = tensors[f"{key}.{component}"][:keep].clone()
    return damage


def drop(*components):
    def damage(tensors, key):
        for component in components:
            del tensors[f"{key}.{component}"]
    return damage


def replace_tensor(component, make):
    def damage(tensors, key):
        tensors[tensor_key(key, component)] = make(tensors[tensor_key(key, component)])
    return damage


def without_double_quant(tensors, key):
    """The same layer stored as bitsandbytes stores it without double quant: fp32 scales (read back
    from the codes, so the weight is unchanged), no nested tensors, no nested_* in the JSON."""
    offset = json.loads(bytes(tensors[f"{key}.{QUANT_STATE_KEY}"].tolist()))["nested_offset"]
    state = NF4State(absmax=tensors[f"{key}.absmax"], shape=torch.Size((256, 256)), dtype=torch.float32,
                     blocksize=64, double_quant=True, absmax2=tensors[f"{key}.nested_absmax"],
                     offset=torch.tensor(offset))
    tensors[f"{key}.absmax"] = state.scales()
    drop("nested_absmax", "nested_quant_map")(tensors, key)
    edit_meta(lambda m: [m.pop(k) for k in ("nested_blocksize", "nested_dtype", "nested_offset")])(tensors, key)


def then(*damages):
    def damage(tensors, key):
        for d in damages:
            d(tensors, key)
    return damage


# case -> (damage of LAYER's "<LAYER>.weight" tensors, the field the error must name (a regex))
DAMAGES = {
    "nested_absmax_empty": (truncate("nested_absmax", 0), r"weight\.nested_absmax holds 0 values.* needs 4"),
    "nested_absmax_1_of_4": (truncate("nested_absmax", 1), r"weight\.nested_absmax holds 1 values.* needs 4"),
    "nested_absmax_nan": (set_item("nested_absmax", 2, float("nan")), r"weight\.nested_absmax holds 1 NaN"),
    "nested_absmax_inf": (set_item("nested_absmax", 0, float("inf")), r"weight\.nested_absmax holds 1 NaN or inf"),
    "nested_offset_nan": (edit_meta(lambda m: m.update(nested_offset=float("nan"))), r"nested_offset nan"),
    "nested_offset_beyond_fp32": (edit_meta(lambda m: m.update(nested_offset=1e39)), r"nested_offset 1e\+39"),
    "nested_offset_missing": (edit_meta(lambda m: m.pop("nested_offset")), r"nested_offset 'missing'"),
    "nested_offset_a_string": (edit_meta(lambda m: m.update(nested_offset="0.05")), r"nested_offset '0.05'"),
    "nested_tensors_removed": (drop("nested_absmax", "nested_quant_map"),
                               r"weight\.absmax holds uint8 codes .*weight\.nested_absmax"),
    "nested_quant_map_removed": (drop("nested_quant_map"),
                                 r"has weight\.nested_absmax but not weight\.nested_quant_map"),
    "nested_quant_map_short": (truncate("nested_quant_map", 255), r"weight\.nested_quant_map holds 255 values"),
    "nested_blocksize_128": (edit_meta(lambda m: m.update(nested_blocksize=128)), r"nested_blocksize 128"),
    "absmax_fp32_with_nested": (replace_tensor("absmax", lambda t: t.float()),
                                r"weight\.absmax is torch\.float32 .*double-quantized"),
    "absmax_short": (truncate("absmax", 1023), r"weight\.absmax holds 1023 values.* needs 1024"),
    "codes_short": (replace_tensor("", lambda t: t[:-16].clone()), r"weight holds 32752 values.* needs 32768"),
    "codes_int8": (replace_tensor("", lambda t: t.view(torch.int8)), r"weight is torch\.int8, expected torch\.uint8"),
    "quant_map_not_nf4": (set_item("quant_map", 3, 0.5), r"weight\.quant_map is not the NF4 table"),
    "json_truncated": (replace_tensor(QUANT_STATE_KEY, lambda t: t[:40].clone()),
                       r"quant_state.* not valid UTF-8 JSON.*JSONDecodeError"),
    "json_not_utf8": (replace_tensor(QUANT_STATE_KEY, lambda t: torch.tensor([0xff, 0xfe, 0x7b], dtype=torch.uint8)),
                      r"quant_state.* not valid UTF-8 JSON.*UnicodeDecodeError"),
    "json_a_list": (replace_tensor(QUANT_STATE_KEY, lambda t: json_bytes("[64, 256]")),
                    r"quant_state.* holds a JSON list, expected an object"),
    "json_deeply_nested": (replace_tensor(QUANT_STATE_KEY, lambda t: json_bytes("[" * 100_000)),
                           r"quant_state.* not valid UTF-8 JSON"),
    "blocksize_0": (edit_meta(lambda m: m.update(blocksize=0)), r"blocksize 0; .*power of two"),
    "blocksize_48": (edit_meta(lambda m: m.update(blocksize=48)), r"blocksize 48; "),
    "blocksize_a_float": (edit_meta(lambda m: m.update(blocksize=64.0)), r"blocksize 64\.0; "),
    "blocksize_missing": (edit_meta(lambda m: m.pop("blocksize")), r"blocksize None; "),
    "shape_zero": (edit_meta(lambda m: m.update(shape=[0, 256])), r"shape \[0, 256\]; expected a list \[out, in\]"),
    "shape_three_dims": (edit_meta(lambda m: m.update(shape=[256, 16, 16])), r"shape \[256, 16, 16\]; expected"),
    "shape_of_another_model": (edit_meta(lambda m: m.update(shape=[128, 512])),
                               r"shape \(128, 512\), the model's layer \(256, 256\)"),
    "quant_type_fp4": (edit_meta(lambda m: m.update(quant_type="fp4")), r"quant_type 'fp4'; minilora reads NF4 only"),
    "no_double_quant_but_nested_offset": (then(without_double_quant, edit_meta(lambda m: m.update(nested_offset=0.1))),
                                          r"describes double quant \(nested_offset\)"),
    "no_double_quant_absmax_nan": (then(without_double_quant, set_item("absmax", 5, float("nan"))),
                                   r"weight\.absmax holds 1 NaN"),
    "no_double_quant_absmax_fp16": (then(without_double_quant, replace_tensor("absmax", lambda t: t.half())),
                                    r"weight\.absmax is torch\.float16; without double quant it must be float32"),
}
CONTROLS = {"intact": None, "intact_without_double_quant": without_double_quant}


def write_case(source: Path, out: Path, damage) -> Path:
    """A copy of the checkpoint directory `source` with LAYER's tensors damaged."""
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    tensors = load_file(source / "model.safetensors")
    if damage is not None:
        damage(tensors, f"{LAYER}.weight")
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def load_and_run(directory: str) -> dict:
    """What loading a checkpoint and one forward pass give: the error, or the logits."""
    from transformers import AutoModelForCausalLM

    try:
        model = ml.load_quantized(directory, model_class=AutoModelForCausalLM)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(IDS)).logits
        return {"outcome": "loaded", "logits": logits.flatten().tolist()}
    except Exception as err:  # noqa: BLE001 - the worker reports every error for the tests to judge
        return {"outcome": type(err).__name__, "message": str(err)}


def worker(directories: list[str]) -> None:
    """Run as a script: one JSON line per case, flushed, so the lines before a crash still arrive."""
    for directory in directories:
        result = {"case": Path(directory).name, **load_and_run(directory)}
        print("RESULT " + json.dumps(result), flush=True)
    print("NATIVE " + json.dumps(native.native_module() is not None), flush=True)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """case -> the worker's report, plus the worker's exit status and stderr."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("malformed_4bit")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "fp")
    ml.export(root / "fp", out=root / "q4", format="nf4", progressbar=False, print_report=False)
    cases = {**CONTROLS, **{name: damage for name, (damage, _) in DAMAGES.items()}}
    dirs = [str(write_case(root / "q4", root / name, damage)) for name, damage in cases.items()]
    run = subprocess.run([sys.executable, __file__, *dirs], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    lines = run.stdout.splitlines()
    results = {r["case"]: r for r in (json.loads(line[7:]) for line in lines if line.startswith("RESULT "))}
    natives = [json.loads(line[7:]) for line in lines if line.startswith("NATIVE ")]
    return {"results": results, "dirs": dict(zip(cases, dirs)), "returncode": run.returncode,
            "stderr": run.stderr[-3000:], "native": natives[0] if natives else None}


def result(outcomes, case) -> dict:
    """The case's report, after checking that the worker neither crashed nor failed."""
    assert outcomes["returncode"] == 0, f"the worker process died ({outcomes['returncode']}): {outcomes['stderr']}"
    assert case in outcomes["results"], f"no report for {case}: {outcomes['stderr']}"
    return outcomes["results"][case]


def test_the_intact_checkpoint_loads_with_and_without_double_quant_on_the_native_path(outcomes):
    intact, plain = result(outcomes, "intact"), result(outcomes, "intact_without_double_quant")
    assert intact["outcome"] == plain["outcome"] == "loaded", (intact, plain)
    logits = torch.tensor(intact["logits"])
    assert bool(torch.isfinite(logits).all()) and logits.abs().max() > 0
    assert torch.equal(logits, torch.tensor(plain["logits"]))  # the same scales, stored both ways
    if native.native_module() is not None:  # it builds here, so it built there and served q_proj
        assert outcomes["native"] is True


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_layer_is_a_value_error_naming_file_layer_and_field(outcomes, case):
    report = result(outcomes, case)
    assert report["outcome"] == "ValueError", report
    message = report["message"]
    assert message.startswith(f"{outcomes['dirs'][case]}: {LAYER}: "), message  # the file, the layer
    assert re.search(DAMAGES[case][1], message), message  # the field, and what is wrong with it


def test_a_refused_layer_is_left_as_it_was():
    """fill_layer checks everything before it assigns anything: the shell keeps its (meta) buffers."""
    from minilora.quant import Linear4bit
    from minilora.quant.bnb_format import fill_layer, layer_tensors, split_key

    torch.manual_seed(0)
    source = Linear4bit(256, 256, bias=False)
    source.set_weight(torch.randn(256, 256))
    parts = {split_key(k)[1] or "": v for k, v in layer_tensors("q", source).items()}
    parts["nested_absmax"] = parts["nested_absmax"][:1]
    shell = Linear4bit(256, 256, bias=False, device="meta")
    with pytest.raises(ValueError, match=r"^here: weight\.nested_absmax holds 1 values"):
        fill_layer(shell, parts, "here")
    assert shell.weight.is_meta and shell.absmax.is_meta and shell.absmax2.is_meta
    parts["nested_absmax"] = source.absmax2.clone()
    fill_layer(shell, parts, "here")  # whole again: filled, the same bytes
    assert torch.equal(shell.packed, source.packed) and torch.equal(shell.absmax2, source.absmax2)


# ---------------------------------------------------------------------------- the native functions' own checks
def quantized_layer(double_quant=True):
    """A 256 × 256 weight in NF4 (65,536 values: 1,024 blocks, 4 scale groups)."""
    torch.manual_seed(0)
    return nf4_quantize(torch.randn(256, 256), 64, double_quant=double_quant, native=False)


def native_cases():
    """name -> (call of the compiled module with one bad argument, the message it must raise)."""
    packed, state = quantized_layer()
    codes, absmax2, offset, n = state.absmax, state.absmax2, state.offset, state.numel
    scales = state.scales()
    u8 = lambda k: torch.zeros(k, dtype=torch.uint8)  # noqa: E731
    return {
        "dq_scales_absmax2_empty": (lambda m: m.dq_scales(codes, absmax2[:0], offset, DYNAMIC_MAP, SCALE_BLOCK),
                                    "1024 scale codes in groups of 256 need 4 values of absmax2.*got 0"),
        "dq_scales_absmax2_1_of_4": (lambda m: m.dq_scales(codes, absmax2[:1], offset, DYNAMIC_MAP, SCALE_BLOCK),
                                     "need 4 values of absmax2.*got 1"),
        "dq_scales_map_255": (lambda m: m.dq_scales(codes, absmax2, offset, DYNAMIC_MAP[:255], SCALE_BLOCK),
                              "dynamic_map must hold the 256 entries.*got 255"),
        "dq_scales_offset_empty": (lambda m: m.dq_scales(codes, absmax2, offset.view(1)[:0], DYNAMIC_MAP, SCALE_BLOCK),
                                   "offset must be one value.*got 0"),
        "dq_scales_offset_two": (lambda m: m.dq_scales(codes, absmax2, offset.repeat(2), DYNAMIC_MAP, SCALE_BLOCK),
                                 "offset must be one value.*got 2"),
        "dq_scales_scale_block_0": (lambda m: m.dq_scales(codes, absmax2, offset, DYNAMIC_MAP, 0),
                                    "scale_block must be positive, got 0"),
        "dq_scales_int_codes": (lambda m: m.dq_scales(codes.int(), absmax2, offset, DYNAMIC_MAP, SCALE_BLOCK),
                                "uint8 CPU codes expected"),
        "unpack_codes_short": (lambda m: m.nf4_unpack(packed[:-1], scales, NF4_LEVELS, n, 64, torch.float32),
                               "65536 values need 32768 packed bytes.*got 32767"),
        "unpack_codes_empty": (lambda m: m.nf4_unpack(u8(0), scales, NF4_LEVELS, n, 64, torch.float32),
                               "need 32768 packed bytes.*got 0"),
        "unpack_scales_short": (lambda m: m.nf4_unpack(packed, scales[:1023], NF4_LEVELS, n, 64, torch.float32),
                                "65536 values in blocks of 64 need 1024 block scales, got 1023"),
        "unpack_scales_are_codes": (lambda m: m.nf4_unpack(packed, codes, NF4_LEVELS, n, 64, torch.float32),
                                    "scales must be floating point.*dq_scales first"),
        "unpack_levels_15": (lambda m: m.nf4_unpack(packed, scales, NF4_LEVELS[:15], n, 64, torch.float32),
                             "levels must hold the 16 NF4 levels, got 15"),
        "unpack_negative_n": (lambda m: m.nf4_unpack(packed, scales, NF4_LEVELS, -1, 64, torch.float32),
                              r"n \(the number of values\) must be >= 0, got -1"),
        "unpack_blocksize_0": (lambda m: m.nf4_unpack(packed, scales, NF4_LEVELS, n, 0, torch.float32),
                               "blocksize must be positive and even, got 0"),
        "unpack_blocksize_odd": (lambda m: m.nf4_unpack(packed, scales, NF4_LEVELS, n, 63, torch.float32),
                                 "blocksize must be positive and even, got 63"),
        "unpack_blocksize_negative": (lambda m: m.nf4_unpack(packed, scales, NF4_LEVELS, n, -64, torch.float32),
                                      "blocksize must be positive and even, got -64"),
        "unpack_codes_int8": (lambda m: m.nf4_unpack(packed.view(torch.int8), scales, NF4_LEVELS, n, 64, torch.float32),
                              "packed codes must be uint8"),
        "pack_blocksize_0": (lambda m: m.nf4_pack(torch.randn(4096), NF4_BOUNDS, 0),
                             "blocksize must be positive and even, got 0"),
        "pack_midpoints_14": (lambda m: m.nf4_pack(torch.randn(4096), NF4_BOUNDS[:14], 64),
                              "midpoints must hold the 15 boundaries.*got 14"),
    }


def native_worker() -> None:
    """Run as a script with --native: each bad call's exception type and message, one JSON line each."""
    module = native.native_module()
    for name, (call, _) in native_cases().items():
        try:
            call(module)
            report = {"outcome": "returned"}
        except Exception as err:  # noqa: BLE001 - reported for the test to judge
            report = {"outcome": type(err).__name__, "message": str(err).splitlines()[0]}
        print("RESULT " + json.dumps({"case": name, **report}), flush=True)


@pytest.fixture(scope="module")
def native_outcomes():
    if native.native_module() is None:
        pytest.skip("the native NF4 path does not build here (no C++ compiler or ninja)")
    run = subprocess.run([sys.executable, __file__, "--native"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    lines = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    return {"results": {r["case"]: r for r in lines}, "returncode": run.returncode, "stderr": run.stderr[-3000:]}


@pytest.mark.parametrize("case", list(native_cases()))
def test_the_native_functions_refuse_a_bad_length_with_a_runtime_error(native_outcomes, case):
    report = result(native_outcomes, case)
    assert report["outcome"] == "RuntimeError", report
    assert re.search(native_cases()[case][1], report["message"]), report["message"]


def test_the_native_functions_still_compute_a_valid_state():
    """The checks refuse only what is wrong: the same layer, whole, dequantizes natively to the
    reference's values."""
    if native.native_module() is None:
        pytest.skip("the native NF4 path does not build here")
    packed, state = quantized_layer()
    assert torch.equal(nf4_dequantize(packed, state, torch.float32, native=True),
                       nf4_dequantize(packed, state, torch.float32, native=False))


# ---------------------------------------------------------------------------- the torch reference refuses them too
def broken_states():
    """name -> (packed, state) with one part wrong, and the message check_state gives."""
    packed, state = quantized_layer()
    _, plain = quantized_layer(double_quant=False)
    return {
        "absmax2_empty": (packed, replace(state, absmax2=state.absmax2[:0]), "absmax2 holds 0 values.*need 4"),
        "absmax2_1_of_4": (packed, replace(state, absmax2=state.absmax2[:1]), "absmax2 holds 1 values.*need 4"),
        "absmax_short": (packed, replace(state, absmax=state.absmax[:1023]), "1023 block scales.*1024 blocks"),
        "codes_short": (packed[:-1], state, "packed codes hold 32767 bytes"),
        "offset_two": (packed, replace(state, offset=state.offset.repeat(2)), "offset must be one value, got 2"),
        "codes_read_as_scales": (packed, replace(state, double_quant=False, absmax2=None, offset=None),
                                 "block scales must be fp32 scales"),
        "scales_read_as_codes": (packed, replace(plain, double_quant=True, absmax2=state.absmax2, offset=state.offset),
                                 "block scales must be uint8 codes"),
        "blocksize_0": (packed, replace(state, blocksize=0), "blocksize is 0"),
    }


@pytest.mark.parametrize("native_path", [False, True, None])
@pytest.mark.parametrize("case", list(broken_states()))
def test_every_path_refuses_a_broken_state_before_computing(case, native_path):
    """nf4_dequantize checks the state (nf4_format.check_state) before choosing a path, so the torch
    reference (native=False, as under MINILORA_NATIVE=0) and the native loop refuse the same states."""
    if native_path and native.native_module() is None:
        pytest.skip("the native NF4 path does not build here")
    packed, state, message = broken_states()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        nf4_dequantize(packed, state, torch.float32, native=native_path)


# ---------------------------------------------------------------------------- where the bytes are bitsandbytes'
def bnb_scale_codes(absmax: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' double-quant codes for block scales `absmax`, as its quantize_4bit computes them."""
    codes, _ = bnbf.quantize_blockwise(absmax - absmax.mean(), blocksize=SCALE_BLOCK)
    return codes


def scale_group(absmax2: float, seed: int = 0, exact: bool = False) -> torch.Tensor:
    """256 block scales whose mean is (about) zero and largest magnitude absmax2: 128 random pairs ±v.
    exact: one pair ±absmax2 and 127 pairs of magnitudes in [2^-135, 2^-134] (absmax2 near 2^-128):
    every partial sum is a multiple of 2^-149 below 2^-125, so exact in any order, the mean exactly 0
    and the group's absmax2 exactly `absmax2` (for the boundary itself)."""
    g = torch.Generator().manual_seed(seed)
    half = SCALE_BLOCK // 2
    if exact:
        v = (1 + torch.rand(half, generator=g)) * 2.0**-135
        v[0] = absmax2
    else:
        v = torch.rand(half, generator=g)
        v = v / v.max() * absmax2
    return torch.cat([v, -v])[torch.randperm(SCALE_BLOCK, generator=g)].float()


@pytest.mark.parametrize("absmax2, exact", [(OVERFLOW + TINIEST, True), (OVERFLOW + 64 * TINIEST, True),
                                            (2.0**-127, False), (2.0**-126, False), (1e-30, False), (0.01, False),
                                            (1.0, False), (1e3, False)])
def test_scale_codes_are_bitsandbytes_wherever_its_reciprocal_is_finite(absmax2, exact):
    """absmax2 > 2^-128: bitsandbytes' fp32 1 / absmax2 is finite and its codes are minilora's, but
    where its approximate search takes the farther neighbour (one code apart; docs/qlora.md)."""
    for seed in range(4):
        absmax = scale_group(absmax2, seed, exact)
        codes, stored_absmax2, _ = quantize_scales(absmax)
        assert stored_absmax2.item() > OVERFLOW and (not exact or stored_absmax2.item() == absmax2)
        apart = (codes.int() - bnb_scale_codes(absmax).int()).abs()
        assert apart.max() <= 1 and (apart == 0).float().mean() >= 0.98, (seed, apart.max(), (apart > 0).sum())


def test_near_the_mean_bitsandbytes_search_strays_up_to_four_codes():
    """bitsandbytes' search is coarser among the dynamic map's smallest entries: a centred scale
    within 5.5e-6 · absmax2 of zero (one equal to the mean: exactly 0) may land up to 4 codes from
    the nearest; 0.0 becomes code 131 (2.1e-5 · absmax2) where minilora writes 127 (0.0)."""
    absmax = torch.cat([torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.logspace(-9, -6, 126), -torch.logspace(-9, -6, 126)])
    codes, _, _ = quantize_scales(absmax)
    theirs = bnb_scale_codes(absmax)
    assert codes[2].item() == 127 and DYNAMIC_MAP[127] == 0 and theirs[2].item() == 131
    apart = (codes.int() - theirs.int()).abs()
    assert 1 < apart.max() <= 4
    assert (apart[absmax.abs() >= 5.5e-6] <= 1).all()


@pytest.mark.parametrize("absmax2, exact", [(OVERFLOW, True), (1e-39, False), (1e-42, False), (2.0**-146, False)])
def test_below_the_boundary_bitsandbytes_writes_signs_and_minilora_the_values(absmax2, exact):
    """0 < absmax2 <= 2^-128: bitsandbytes multiplies by 1 / absmax2 = inf and writes 255 for a
    positive centred scale, 0 otherwise; minilora's codes differ, and read back each scale within its
    8-bit step (bitsandbytes' read back ±absmax2)."""
    absmax = scale_group(absmax2, exact=exact)
    codes, stored_absmax2, offset = quantize_scales(absmax)
    assert 0 < stored_absmax2.item() <= OVERFLOW and (not exact or stored_absmax2.item() == absmax2)
    theirs = bnb_scale_codes(absmax)
    centred = absmax - absmax.mean()
    assert torch.equal(theirs, torch.where(centred > 0, 255, 0).to(torch.uint8))
    assert not torch.equal(codes, theirs)
    read = DYNAMIC_MAP[codes.long()] * stored_absmax2 + offset
    assert ((read - absmax).abs() <= STEP * stored_absmax2 + TINIEST).all()


def test_double_quant_refuses_block_scales_whose_mean_overflows():
    """Block scales near fp32's limit: their mean (the offset) is inf, which no reader could use;
    quantizing says so instead of writing it. Without double quant they are stored as they are."""
    W = torch.full((4, 64), 3e38)
    with pytest.raises(ValueError, match=r"cannot store block scales up to 3\.000e\+38.*double_quant=False"):
        nf4_quantize(W, 64, double_quant=True)
    packed, state = nf4_quantize(W, 64, double_quant=False)
    assert torch.equal(nf4_dequantize(packed, state, torch.float32), W)


def test_a_subnormal_weight_differs_from_bitsandbytes_only_in_its_overflowing_scale_group():
    """One weight, two scale groups of 256 blocks: block scales 5e-38 ± 2e-38 (absmax2 ≈ 2e-38) and
    5e-38 ± 1e-39 (absmax2 ≈ 1.4e-39 < 2^-128). Through bitsandbytes' own quantize_4bit: the packed
    codes, absmax2 and offset are equal; the first group's codes agree (up to its one-code strays),
    the second's are bitsandbytes' signs where minilora's are the values."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(512, generator=g) * 2 - 1
    block_scales = torch.cat([5e-38 + 2e-38 * u[:256], 5e-38 + 1e-39 * u[256:]])
    W = torch.linspace(-1, 1, 64).unsqueeze(0) * block_scales.unsqueeze(1)  # (512, 64): block b has absmax scales[b]
    packed, state = nf4_quantize(W, 64, double_quant=True)
    their_packed, qs = bnbf.quantize_4bit(W.clone(), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(state.absmax2, qs.state2.absmax) and torch.equal(state.offset, qs.offset)
    assert state.absmax2[0] > OVERFLOW >= state.absmax2[1]
    apart = (state.absmax.int() - qs.absmax.int()).abs()
    assert apart[:256].max() <= 1
    assert apart[256:].max() > 1 and set(qs.absmax[256:].tolist()) == {0, 255}
    step = STEP * state.absmax2.repeat_interleave(256)
    assert ((state.scales() - block_scales).abs() <= step + TINIEST).all()


if __name__ == "__main__":
    native_worker() if sys.argv[1:] == ["--native"] else worker(sys.argv[1:])
