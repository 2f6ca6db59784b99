"""A stored 4-bit weight is read as it was written: module casts, state dicts, bitsandbytes' own
double-quant map in both directions, and the edge scales (all equal, subnormal, many decades).

bitsandbytes is the oracle: each cross-read runs through its own map and its own dequantizer, so
a failure says whether minilora or the port of its logic is wrong.
"""

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import make
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import NF4Config, quantize_model
from minilora.quant import Linear4bit, NF4State, nf4_dequantize, nf4_quantize
from minilora.quant.nf4 import SCALE_BLOCK

BNB_MAP = bnbf.create_dynamic_map(signed=True)  # bitsandbytes' map, as its GPU path and checkpoints hold it
CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to_fp16": lambda m: m.to(torch.float16),
    "to_bf16": lambda m: m.to(dtype=torch.bfloat16),
    "float": lambda m: m.float(),
    "double": lambda m: m.double(),
    "to_cpu": lambda m: m.to("cpu"),
}


def quantized_layer(double_quant, compute_dtype=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(96, 40).to(dtype)
    with torch.no_grad():
        lin.weight[3] *= 1e-3  # one row of small scales: codes near the ends of the dynamic map
    return Linear4bit.from_float(lin, NF4Config(blocksize=32, double_quant=double_quant, compute_dtype=compute_dtype))


def stored(layer):
    return {name: getattr(layer, name).clone() for name in ("weight", "absmax", "absmax2", "offset")
            if getattr(layer, name) is not None}


# ---------------------------------------------------------------- casts never change the weight
@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_a_cast_moves_compute_dtype_and_bias_but_never_the_stored_weight(cast, double_quant):
    layer = quantized_layer(double_quant, compute_dtype=torch.float32)
    before, values = stored(layer), layer.dequantized_weight(torch.float32)
    CASTS[cast](layer)
    after = stored(layer)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]), name
    assert torch.equal(layer.dequantized_weight(torch.float32), values)
    floating = {"half": torch.float16, "bfloat16": torch.bfloat16, "to_fp16": torch.float16,
                "to_bf16": torch.bfloat16, "float": torch.float32, "double": torch.float64}.get(cast)
    assert layer.bias.dtype == (floating or torch.float32)
    assert layer.config.compute_dtype == (floating or torch.float32)  # follows the cast, as the bias does
    assert layer.weight_dtype == torch.float32  # what was quantized does not change


def test_compute_dtype_none_stays_none_the_input_decides():
    layer = quantized_layer(True).half()
    assert layer.config.compute_dtype is None
    assert layer(torch.randn(2, 96, dtype=torch.float16)).dtype == torch.float16


@settings(max_examples=12, deadline=None)
@given(casts=st.lists(st.sampled_from(sorted(CASTS)), min_size=1, max_size=4), family=st.sampled_from(["gpt2", "llama"]))
def test_random_casts_of_a_quantized_model_keep_every_weight(casts, family):
    model = make(family)
    quantize_model(model, NF4Config(blocksize=64, double_quant=True), skip_modules=["lm_head"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert layers
    values = {n: m.dequantized_weight(torch.float32) for n, m in layers.items()}
    for cast in casts:
        CASTS[cast](model)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantized_weight(torch.float32), values[name]), name
        assert layer.absmax.dtype == torch.uint8 and layer.absmax2.dtype == layer.offset.dtype == torch.float32
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        logits = model(input_ids=torch.randint(1, 128, (1, 6))).logits
    assert logits.dtype == dtype and bool(torch.isfinite(logits.float()).all())


# ---------------------------------------------------------------- the state dict carries the dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_reloaded_layer_computes_as_the_saved_one(dtype):
    saved = quantized_layer(True, dtype=dtype)
    state = saved.state_dict()
    assert "_extra_state" in state and state["absmax2"].dtype == torch.float32
    fresh = Linear4bit(96, 40, config=NF4Config(blocksize=32))
    fresh.load_state_dict(state)
    assert fresh.weight_dtype == dtype
    assert torch.equal(fresh.dequantized_weight(), saved.dequantized_weight())  # in the saved dtype
    assert fresh.dequantized_weight().dtype == dtype
    x = torch.randn(3, 96, dtype=dtype)
    assert torch.equal(fresh(x), saved(x))


def test_a_damaged_extra_state_is_refused():
    state = quantized_layer(False).state_dict()
    state["_extra_state"] = torch.tensor(99, dtype=torch.uint8)
    with pytest.raises(ValueError, match="names no dtype"):
        Linear4bit(96, 40, config=NF4Config(blocksize=32, double_quant=False)).load_state_dict(state)


# ---------------------------------------------------------------- bitsandbytes' map, both ways
def to_bnb(packed, state):
    """minilora's bytes as bitsandbytes' QuantState, with bitsandbytes' own map."""
    state2 = bnbf.QuantState(absmax=state.absmax2, code=BNB_MAP.clone(), blocksize=SCALE_BLOCK, dtype=torch.float32)
    qs = bnbf.QuantState(absmax=state.absmax, shape=state.shape, code=bnbf.get_4bit_type("nf4", device="cpu"),
                         blocksize=state.blocksize, quant_type="nf4", dtype=state.dtype, offset=state.offset,
                         state2=state2)
    return packed.view(-1, 1), qs


def from_bnb(packed, qs):
    return packed.view(-1), NF4State(absmax=qs.absmax, shape=qs.shape, dtype=qs.dtype, blocksize=qs.blocksize,
                                     double_quant=True, absmax2=qs.state2.absmax, offset=qs.offset)


def cross_read(W, blocksize=64):
    """(ours, bitsandbytes reading ours, bitsandbytes' own, ours reading bitsandbytes') as fp32."""
    packed, state = nf4_quantize(W, blocksize, double_quant=True)
    their_packed, qs = bnbf.quantize_4bit(W.clone(), blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(qs.state2.code, BNB_MAP)
    return (nf4_dequantize(packed, state, torch.float32),
            bnbf.dequantize_4bit(*to_bnb(packed, state)).float().view(W.shape),
            bnbf.dequantize_4bit(their_packed, qs).float().view(W.shape),
            nf4_dequantize(*from_bnb(their_packed, qs), torch.float32)), (packed, state, their_packed, qs)


def test_scale_code_zero_reads_as_bitsandbytes_reads_it():
    """256 blocks of absmax 1 and one of 1e-3: its centred scale is the group's most negative value,
    stored as code 0 by both libraries, and both must read it back the same (≈ 0.0080)."""
    torch.manual_seed(0)
    W = torch.randn(256, 64)
    W = W / W.abs().amax(1, keepdim=True)  # every row (block) has absmax 1
    W[7] *= 1e-3
    (ours, bnb_reads_ours, theirs, ours_reads_theirs), (packed, state, their_packed, qs) = cross_read(W)
    assert int(state.absmax[7]) == int(qs.absmax[7]) == 0
    assert torch.equal(packed, their_packed.view(-1)) and torch.equal(state.absmax, qs.absmax)
    assert state.scales()[7].item() == pytest.approx(0.0080, abs=2e-4)
    for other in (bnb_reads_ours, theirs, ours_reads_theirs):
        assert torch.equal(ours, other)


@settings(max_examples=30, deadline=None)
@given(decades=st.lists(st.floats(-30, 3), min_size=1, max_size=300), seed=st.integers(0, 2**16))
def test_scales_spanning_many_decades_cross_read_exactly(decades, seed):
    """Block scales from 1e-30 to 1e3 in one weight; each library reads the other's bytes to the
    same values, through bitsandbytes' own map."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([10.0 ** d for d in decades]).repeat_interleave(64)  # (n_blocks · 64,)
    W = (torch.rand(scale.numel(), generator=g) * 2 - 1) * scale
    (ours, bnb_reads_ours, theirs, ours_reads_theirs), (packed, state, their_packed, qs) = cross_read(W.view(-1, 64))
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(ours, bnb_reads_ours) and torch.equal(theirs, ours_reads_theirs)
    # bitsandbytes' approximate search may take the farther of the two neighbours: one code apart
    differ = (state.absmax != qs.absmax).nonzero().view(-1)
    assert all(abs(int(state.absmax[i]) - int(qs.absmax[i])) == 1 for i in differ.tolist())


def test_a_group_of_equal_scales_is_stored_as_bitsandbytes_stores_it():
    W = torch.linspace(-0.5, 0.5, 64).view(1, 64)  # one block: its scale is the group's mean
    (ours, bnb_reads_ours, theirs, ours_reads_theirs), (packed, state, their_packed, qs) = cross_read(W)
    assert state.absmax2.item() == 0 and state.absmax.tolist() == qs.absmax.tolist() == [0]
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(state.scales(), torch.tensor([0.5]))
    for other in (bnb_reads_ours, theirs, ours_reads_theirs):
        assert torch.equal(ours, other)


def test_subnormal_scale_groups_keep_their_values_where_bitsandbytes_overflows():
    """Block scales whose centred values are subnormal (below 2.9e-39): bitsandbytes multiplies by
    1 / absmax2 = inf and writes codes 0 and 255 whatever the values; minilora divides and keeps
    each scale within its 8-bit resolution. docs/qlora.md names this case."""
    scales = torch.tensor([1e-39, 3e-39, 5e-39, 2e-39, 4e-39, 6e-39])  # absmax2 ≈ 2.5e-39
    W = (torch.linspace(-1, 1, 64).unsqueeze(0) * scales.unsqueeze(1))  # (6, 64): block b has absmax scales[b]
    packed, state = nf4_quantize(W, 64, double_quant=True)
    true_scales = W.abs().amax(1)
    assert bool(((state.scales() - true_scales).abs() <= 0.0071 * state.absmax2 + 1e-45).all())
    _, qs = bnbf.quantize_4bit(W.clone(), blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_scales = BNB_MAP[qs.absmax.long()] * qs.state2.absmax + qs.offset
    assert set(qs.absmax.tolist()) <= {0, 255, 127}  # the overflow's mark
    assert (bnb_scales - true_scales).abs().max() > (state.scales() - true_scales).abs().max()


def test_blocksize_16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="bitsandbytes accepts 16.*use 32"):
        nf4_quantize(torch.randn(64), blocksize=16)
