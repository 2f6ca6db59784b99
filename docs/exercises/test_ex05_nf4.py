"""Exercise 5: NF4 by hand, against bitsandbytes' bytes and minilora's nf4_quantize / nf4_dequantize."""

import bitsandbytes.functional as bnbf
import torch

from minilora.quant import NF4_LEVELS, nf4_dequantize, nf4_quantize

SHAPES = [(64, 128), (32, 96), (4, 64)]


def weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def test_small_example_by_hand(ex):
    """A block of 64 whose absmax is 2: codes of ±2 are 0 and 15, of 0 is 7; [−2, 0] packs to 0x07."""
    W = torch.zeros(64)
    W[0], W[2], W[3] = -2.0, 2.0, 2.0 * NF4_LEVELS[12]
    packed, absmax = ex.quantize_nf4(W)
    assert packed.dtype == torch.uint8 and packed.shape == (32,) and torch.equal(absmax, torch.tensor([2.0]))
    assert packed[0].item() == 0x07 and packed[1].item() == 0xFC and packed[2].item() == 0x77


def test_same_bytes_as_bitsandbytes(ex):
    """Codes and absmax equal bitsandbytes' quantize_4bit(quant_type="nf4") on the CPU, byte for byte."""
    for seed, shape in enumerate(SHAPES):
        W = weight(shape, seed)
        packed, absmax = ex.quantize_nf4(W)
        theirs, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4")
        assert torch.equal(packed, theirs.view(-1)), shape
        assert torch.equal(absmax, state.absmax), shape


def test_same_bytes_as_minilora_at_other_block_sizes(ex):
    """At block sizes 32 and 256 too, equal to nf4_quantize(W, blocksize, double_quant=False)."""
    W = weight((16, 256), seed=5)
    for blocksize in (32, 64, 256):
        packed, absmax = ex.quantize_nf4(W, blocksize)
        theirs, state = nf4_quantize(W, blocksize, double_quant=False)
        assert torch.equal(packed, theirs) and torch.equal(absmax, state.absmax), blocksize


def test_dequantize_is_minilora_s_and_within_the_bound(ex):
    """Dequantizing equals nf4_dequantize exactly (one fp32 product per value), and each error is at
    most half the widest gap between levels times the block's absmax."""
    W = weight((64, 128), seed=7)
    packed, absmax = ex.quantize_nf4(W)
    W_hat = ex.dequantize_nf4(packed, absmax, W.shape)
    _, state = nf4_quantize(W, 64, double_quant=False)
    assert W_hat.shape == W.shape and W_hat.dtype == torch.float32
    assert torch.equal(W_hat, nf4_dequantize(packed, state, torch.float32))
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    error = (W_hat - W).reshape(-1, 64).abs()
    assert bool((error <= half_gap * absmax.unsqueeze(1) + 1e-9).all())
