"""Tier 1, algebra: what LoraLinear must satisfy for any weights."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import linear
from minilora import LoraLinear
from minilora.lora import FULL, LoraPart


def lora(base, parts=None, r=4, alpha=8.0, init=False, **kw):
    layer = LoraLinear(base)
    parts = parts or {FULL: (0, layer.out_features)}
    layer.add_adapter("a", {p: LoraPart(first, end, r, alpha) for p, (first, end) in parts.items()},
                      init_lora_weights=init, **kw)
    layer.active_adapters = ["a"]
    return layer


def dense_weight(layer):
    """The base weight as (d_out, d_in), whatever the storage."""
    W = layer.base_layer.weight
    return W.T if layer.fan_in_fan_out else W


@pytest.mark.parametrize("conv1d", [False, True])
def test_fresh_adapter_is_bit_identical(conv1d):
    base = linear(16, 24, conv1d)
    x = torch.randn(3, 5, 16)
    expected = base(x)
    layer = lora(base, init=True)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_is_the_formula(conv1d):
    layer = lora(linear(16, 24, conv1d), r=4, alpha=8.0)
    x = torch.randn(3, 5, 16)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = layer.base_layer(x) + (8.0 / 4) * (x @ A.T) @ B.T  # (B,T,d_in)@(d_in,r)@(r,d_out)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_adds_scaled_BA_and_unmerge_restores(conv1d):
    layer = lora(linear(16, 24, conv1d), r=4, alpha=6.0)
    W0 = dense_weight(layer).clone()
    x = torch.randn(4, 16)
    y_adapter = layer(x)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    layer.merge()
    torch.testing.assert_close(dense_weight(layer), W0 + (6.0 / 4) * B @ A)
    torch.testing.assert_close(layer(x), y_adapter)  # merged forward skips the low-rank path
    layer.merge()  # idempotent: not added twice
    torch.testing.assert_close(dense_weight(layer), W0 + (6.0 / 4) * B @ A)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(dense_weight(layer), W0, atol=1e-6, rtol=0)
    assert not layer.merged


@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_slices_equal_separate_q_v_loras_and_k_is_untouched(conv1d):
    d = 12
    base = linear(d, 3 * d, conv1d)
    parts = {"q": (0, d), "v": (2 * d, 3 * d)}
    layer = lora(base, parts=parts, r=3, alpha=5.0)
    x = torch.randn(2, 7, d)
    y0 = base(x)
    y = layer(x)
    s = 5.0 / 3
    for part, (first, end) in parts.items():
        A, B = layer.lora_A["a"][part].weight, layer.lora_B["a"][part].weight
        torch.testing.assert_close(y[..., first:end], y0[..., first:end] + s * (x @ A.T) @ B.T)
    assert torch.equal(y[..., d:2 * d], y0[..., d:2 * d])  # K, bit for bit

    W0 = dense_weight(layer).clone()
    layer.merge()
    W = dense_weight(layer)
    assert torch.equal(W[d:2 * d], W0[d:2 * d])  # K rows of W untouched by merge
    torch.testing.assert_close(W[:d], W0[:d] + s * layer.lora_B["a"]["q"].weight @ layer.lora_A["a"]["q"].weight)
    layer.unmerge()
    assert torch.equal(dense_weight(layer)[d:2 * d], W0[d:2 * d])


def test_rslora_scales_by_sqrt_r():
    layer = lora(linear(16, 16), r=4, alpha=8.0, use_rslora=True)
    assert layer.scaling["a"] == pytest.approx(8.0 / math.sqrt(4))


def test_init_kaiming_and_gaussian():
    layer = lora(linear(64, 64), r=8, init=True)
    A = layer.lora_A["a"].weight
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a=√5 on fan_in 64
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    g = lora(linear(64, 64), r=8, init="gaussian")
    assert g.lora_A["a"].weight.std().item() == pytest.approx(1 / 8, rel=0.2)


def test_adapter_dtype_is_independent_of_the_base_and_autocast_works():
    base = linear(16, 24).to(torch.bfloat16)
    layer = lora(base)
    assert layer.lora_A["a"].weight.dtype == torch.float32
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    ref = base(x).float() + 2.0 * (x.float() @ A.T) @ B.T
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    fp32 = lora(linear(16, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(torch.randn(5, 16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert fp32.lora_A["a"].weight.grad is not None


def test_gradients_reach_only_the_adapter():
    layer = lora(linear(16, 24))
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A["a"].weight.grad.abs().sum() > 0
    assert layer.lora_B["a"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None
    assert x.grad is not None  # the input gradient still flows to earlier layers


def test_rank_larger_than_the_layer_works_as_in_peft():
    layer = lora(linear(16, 8), r=9)  # more rank than min(d_in, d_out): allowed, as PEFT allows it
    x = torch.randn(3, 16)
    expected = layer.base_layer(x) + x @ layer.delta_weight("a", FULL).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    conv1d=st.booleans(),
    rows=st.integers(1, 6),
)
def test_properties_over_shapes(d_in, d_out, r, alpha, conv1d, rows):
    r = min(r, d_in, d_out)
    layer = lora(linear(d_in, d_out, conv1d), r=r, alpha=alpha)
    x = torch.randn(rows, d_in, dtype=torch.float32)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    y = layer(x)
    torch.testing.assert_close(y, layer.base_layer(x) + (alpha / r) * (x @ A.T) @ B.T, atol=1e-4, rtol=1e-4)
    W0 = dense_weight(layer).clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), y, atol=1e-4, rtol=1e-4)
    layer.unmerge()
    torch.testing.assert_close(dense_weight(layer), W0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spans", [((0, 6, 1),), ((0, 2, 1), (4, 6, 1)), ((0, 1, 3), (2, 3, 2))])
def test_low_rank_add_backward_is_the_derivative(spans):  # spans: (first, end, blocks)
    from minilora.plain_lora import LowRankAdd

    torch.manual_seed(0)
    y = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    factors = []
    for first, end, blocks in spans:
        factors += [torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
                    torch.randn((end - first) * blocks, 2, dtype=torch.float64, requires_grad=True)]
    scales = tuple(0.5 + i for i in range(len(spans)))
    assert torch.autograd.gradcheck(lambda y, *f: LowRankAdd.apply(y, spans, scales, *f), (y, *factors))
