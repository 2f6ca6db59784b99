"""NF4 + double quant: the bytes of bitsandbytes, each library reading the other, and the error bound."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.quant import DYNAMIC_MAP, NF4_LEVELS, NF4State, nf4_dequantize, nf4_quantize
from minilora.quant.nf4 import SCALE_BLOCK

SHAPES = [(64, 64), (33, 17), (1000, 3), (7,), (4096,), (128, 96), (5, 320), (512, 256)]  # the last: native path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05 + 0.001).to(dtype)


def to_bnb(packed, state):
    """minilora's (packed, state) as bitsandbytes' (tensor, QuantState)."""
    code = bnbf.get_4bit_type("nf4", device="cpu")
    state2 = bnbf.QuantState(absmax=state.absmax2, code=bnbf.create_dynamic_map(signed=True), blocksize=SCALE_BLOCK,
                             dtype=torch.float32) if state.double_quant else None
    qs = bnbf.QuantState(absmax=state.absmax, shape=state.shape, code=code, blocksize=state.blocksize,
                         quant_type="nf4", dtype=state.dtype, offset=state.offset, state2=state2)
    return packed.view(-1, 1), qs


def from_bnb(packed, qs, double_quant):
    return packed.view(-1), NF4State(
        absmax=qs.absmax, shape=qs.shape, dtype=qs.dtype, blocksize=qs.blocksize, double_quant=double_quant,
        absmax2=qs.state2.absmax if double_quant else None, offset=qs.offset if double_quant else None)


def bnb_dequant_is_trustworthy(shape, blocksize):
    """bitsandbytes 0.50's native CPU kernel mis-scales blocks that straddle rows."""
    return shape[-1] % blocksize == 0


def test_dynamic_map_is_bitsandbytes_signed_map():
    theirs = bnbf.create_dynamic_map(signed=True)  # the map bitsandbytes decodes with and saves
    assert torch.equal(DYNAMIC_MAP, theirs) and DYNAMIC_MAP[0] == pytest.approx(-0.99297, abs=1e-5)
    assert DYNAMIC_MAP.numel() == 256 and bool((DYNAMIC_MAP[1:] > DYNAMIC_MAP[:-1]).all())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_same_bytes_as_bitsandbytes_without_double_quant(shape, dtype, blocksize):
    W = weight(shape, dtype)
    packed, state = nf4_quantize(W, blocksize, double_quant=False)
    their_packed, qs = bnbf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(state.absmax, qs.absmax)
    ours = nf4_dequantize(packed, state)
    assert torch.equal(ours, nf4_dequantize(*from_bnb(their_packed, qs, False)))
    if bnb_dequant_is_trustworthy(shape, blocksize):
        assert torch.equal(bnbf.dequantize_4bit(*to_bnb(packed, state)).view(shape), ours)


@pytest.mark.parametrize("shape", [(64, 64), (300, 128), (33, 17), (96, 640), (512, 384)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_matches_bitsandbytes(shape, dtype):
    W = weight(shape, dtype, seed=3)
    packed, state = nf4_quantize(W, 64, double_quant=True)
    their_packed, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(state.offset, qs.offset) and torch.equal(state.absmax2, qs.state2.absmax)
    # scale codes: the exact nearest entry of the dynamic map. bitsandbytes' CPU search can pick the
    # other neighbour when a value sits within a hair of the midpoint; allow exactly that.
    differ = (state.absmax != qs.absmax).nonzero().view(-1)
    assert differ.numel() <= max(1, state.absmax.numel() // 100)
    for i in differ.tolist():
        a, b = int(state.absmax[i]), int(qs.absmax[i])
        assert abs(a - b) == 1
    # each library reads the other's bytes to identical values
    ours = nf4_dequantize(packed, state)  # in W's dtype, as bitsandbytes does
    assert torch.equal(nf4_dequantize(*from_bnb(their_packed, qs, True)), bnbf.dequantize_4bit(their_packed, qs).view(shape))
    if bnb_dequant_is_trustworthy(shape, 64):
        assert torch.equal(bnbf.dequantize_4bit(*to_bnb(packed, state)).view(shape), ours)


def test_bits_per_weight():
    W = weight((1024, 1024), torch.bfloat16)
    for dq, bits in ((False, 4.5), (True, 4 + 8 / 64 + 32 / (64 * 256))):
        packed, state = nf4_quantize(W, 64, dq)
        assert 8 * (packed.numel() + state.nbytes()) / W.numel() == pytest.approx(bits, abs=1e-3)


def worst_scale_code_error() -> float:
    """The largest |decoded - encoded value| of an 8-bit scale code over [-1, 1], from the tables: the
    encoder's boundaries are midpoints of the map with entry 0 taken as -1.0; the decoder reads the map."""
    encoding = torch.cat([torch.tensor([-1.0]), DYNAMIC_MAP[1:]])
    bounds = (encoding[:-1] + encoding[1:]) / 2
    low, high = torch.cat([torch.tensor([-1.0]), bounds]), torch.cat([bounds, torch.tensor([1.0])])
    return float(torch.maximum((DYNAMIC_MAP - low).abs(), (high - DYNAMIC_MAP).abs()).max())


WORST_SCALE_CODE_ERROR = worst_scale_code_error()


def test_the_worst_scale_code_error_is_that_of_the_first_codes():
    assert 0.0105 < WORST_SCALE_CODE_ERROR < 0.0106


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), blocksize=st.sampled_from([32, 64, 128]),
       scale=st.floats(1e-3, 10.0), double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_error_bound_codes_and_determinism(rows, cols, blocksize, scale, double_quant, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = nf4_quantize(W, blocksize, double_quant)
    again = nf4_quantize(W, blocksize, double_quant)
    assert torch.equal(packed, again[0]) and torch.equal(state.absmax, again[1].absmax)
    assert packed.dtype == torch.uint8 and packed.numel() == (W.numel() + 1) // 2  # two 4-bit codes per byte
    W_hat = nf4_dequantize(packed, state, torch.float32)
    absmax = W.reshape(-1).abs()
    n = W.numel()
    per_block = torch.nn.functional.pad(absmax, (0, -n % blocksize)).view(-1, blocksize).amax(1)
    per_value = per_block.repeat_interleave(blocksize)[:n].view(W.shape)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    block_err = (state.scales() - per_block).abs()  # (n_blocks,): 0 without DQ
    if double_quant:  # an 8-bit scale is off by at most its code's worst distance to the values it
        # encodes, times its group's range absmax2; codes are chosen as if entry 0 were -1.0 but code 0
        # reads -0.99297 (bitsandbytes' entry), so codes 0 and 1 stray furthest (≈ 0.0106)
        group_range = state.absmax2.repeat_interleave(SCALE_BLOCK)[: per_block.numel()]
        assert bool((block_err <= WORST_SCALE_CODE_ERROR * group_range + 1e-6 * per_block).all())
    scale_err = block_err.repeat_interleave(blocksize)[:n].view(W.shape)
    # codes are chosen with the true absmax, values rebuilt with the stored one (levels lie in [-1, 1])
    assert bool(((W_hat - W).abs() <= half_gap * per_value * (1 + 1e-6) + scale_err + 1e-7).all())


# ---------------------------------------------------------------- bad input, clear errors
def test_bad_inputs():
    with pytest.raises(TypeError, match="needs a floating-point weight, got torch.int64"):
        nf4_quantize(torch.arange(64))
    for bs in (48, 16, 8192):
        with pytest.raises(ValueError, match="power of two from 32 to 4096"):
            nf4_quantize(torch.randn(64), blocksize=bs)
    with pytest.raises(ValueError, match="empty tensor"):
        nf4_quantize(torch.empty(0, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        nf4_quantize(torch.tensor([1.0, float("nan")]))
    packed, state = nf4_quantize(torch.randn(8, 8))
    with pytest.raises(ValueError, match="packed and state do not belong together"):
        nf4_dequantize(packed[:-1], state)
    with pytest.raises(TypeError, match="torch.int32 is not"):
        nf4_dequantize(packed, state, torch.int32)


# ---------------------------------------------------------------- the native CPU path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, blocksize", [((512, 384), 64), ((257, 259), 64), ((1000, 77), 32), ((300, 301), 4096)])
def test_native_path_gives_the_reference_bytes_and_values(dtype, shape, blocksize):
    W = weight(shape, dtype, seed=7)
    for double_quant in (False, True):
        packed, state = nf4_quantize(W, blocksize, double_quant, native=True)
        ref_packed, ref_state = nf4_quantize(W, blocksize, double_quant, native=False)
        assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(nf4_dequantize(packed, state, out_dtype, native=True),
                               nf4_dequantize(packed, state, out_dtype, native=False))


def test_native_path_refuses_nan_too():
    W = torch.randn(300, 300)
    W[100, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        nf4_quantize(W, native=True)


def test_nf4_has_the_lowest_error_on_normal_weights():
    from minilora.quant import fake_quantize, quantization_error

    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    err = quantization_error(W)
    assert err["nf4"]["mse"] < err["int4"]["mse"] < err["fp4"]["mse"]
    packed, state = nf4_quantize(W, 64, double_quant=False)
    assert torch.equal(fake_quantize(W, "nf4"), nf4_dequantize(packed, state, torch.float32))  # same rounding
