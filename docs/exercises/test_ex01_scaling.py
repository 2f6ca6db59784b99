"""Exercise 1: α/r and rsLoRA's α/√r, against minilora's layers, and the update's size against r."""

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model

RANKS = (4, 16, 64, 256)


def scaling_of(r, alpha, rslora):
    """The scale minilora gives a c_fc adapter of rank r (a tiny GPT-2 built from its config)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_fc"], use_rslora=rslora))
    return wrapped.model.transformer.h[0].mlp.c_fc.scaling["default"]


def test_the_scale_is_minilora_s(ex):
    """α/r and α/√r, equal to the scale minilora's layers hold (to the last bit of a float)."""
    for r, alpha in ((8, 16), (4, 32), (16, 8)):
        assert ex.lora_scaling(alpha, r) == scaling_of(r, alpha, False) == alpha / r
        assert math.isclose(ex.lora_scaling(alpha, r, rslora=True), scaling_of(r, alpha, True), rel_tol=1e-15)
    assert math.isclose(ex.lora_scaling(16, 4, rslora=True), 8.0)


def test_update_rms_is_the_rms_of_the_update(ex):
    """On numbers worked by hand: x = [1, 2], A = [[1, 0]], B = [[3], [4]] gives h = s·[3, 4]."""
    x = torch.tensor([[1.0, 2.0]])
    A, B = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0], [4.0]])
    assert math.isclose(ex.update_rms(A, B, x, 2.0), 2.0 * math.sqrt(12.5), rel_tol=1e-6)


def sizes(ex, rslora):
    """The update's RMS at each rank, with A, B and x of unit-variance entries (trained factors,
    not B = 0), α = 16, d = 512; one seed per rank, 256 inputs: the RMS is within a few percent of its law."""
    out = []
    for r in RANKS:
        g = torch.Generator().manual_seed(r)
        d = 512
        A = torch.randn(r, d, generator=g) / math.sqrt(d)  # x·A_k has unit variance
        B = torch.randn(d, r, generator=g)
        x = torch.randn(256, d, generator=g)
        out.append(ex.update_rms(A, B, x, ex.lora_scaling(16.0, r, rslora)))
    return out


def test_alpha_over_r_shrinks_the_update_as_r_grows(ex):
    """With α/r the RMS falls like 1/√r: from r = 4 to r = 256 by √64 = 8 (±15 %)."""
    plain = sizes(ex, rslora=False)
    assert all(a > b for a, b in zip(plain, plain[1:]))
    assert 8 * 0.85 < plain[0] / plain[-1] < 8 * 1.15


def test_rslora_keeps_the_update_s_size(ex):
    """With α/√r the RMS stays within ±15 % of its value at r = 4 for every rank up to 256."""
    stable = sizes(ex, rslora=True)
    assert all(0.85 < s / stable[0] < 1.15 for s in stable)


def test_alpha_for_another_rank_keeps_the_scale(ex):
    """Doubling r (minilora's fused Q+V export) doubles α; rsLoRA multiplies it by √2; either way
    minilora's layer at the new rank and α has the old scale."""
    assert ex.alpha_for_rank(8.0, 4, 8) == 16.0
    assert math.isclose(ex.alpha_for_rank(8.0, 4, 8, rslora=True), 8.0 * math.sqrt(2), rel_tol=1e-15)
    for rslora in (False, True):
        new_alpha = ex.alpha_for_rank(12.0, 4, 16, rslora)
        assert math.isclose(scaling_of(16, new_alpha, rslora), scaling_of(4, 12.0, rslora), rel_tol=1e-12)
