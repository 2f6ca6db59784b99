"""Exercise 6: double quantization, against what minilora's NF4 state holds, bitsandbytes, and measured storage."""

import bitsandbytes.functional as bnbf
import torch

from minilora.quant import nf4_quantize


def weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def block_absmax(W, blocksize=64):
    return W.reshape(-1, blocksize).abs().amax(dim=1)


def test_storage_is_what_minilora_stores(ex):
    """Exact bytes: packed codes plus state.nbytes(), with and without double quant, for shapes whose
    last block or last scale group is partial."""
    for shape in [(64, 64), (33, 17), (7,), (300, 128), (1000, 3)]:
        W = weight(shape)
        for blocksize in (64, 128):
            for double_quant in (False, True):
                packed, state = nf4_quantize(W, blocksize, double_quant)
                assert ex.storage_bytes(W.numel(), blocksize, double_quant) == packed.numel() + state.nbytes(), \
                    (shape, blocksize, double_quant)


def test_bits_per_weight(ex):
    """A 4096 x 4096 weight: 4.5 bits per weight without double quant, 4 + 8/64 + 32/(64·256) ≈ 4.127
    with it, plus the one 32-bit offset spread over 16.8M weights (1.9e-6 bits each)."""
    n = 4096 * 4096
    assert 8 * ex.storage_bytes(n, 64, False) / n == 4.5
    bits = 8 * ex.storage_bytes(n, 64, True) / n
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256) + 32 / n)) < 1e-12
    assert round(bits, 3) == 4.127


def test_codes_scales_and_offset_are_minilora_s(ex):
    """The codes, absmax2 and offset equal those nf4_quantize(W, 64, double_quant=True) stores, exactly."""
    for seed, shape in enumerate([(128, 512), (96, 640), (33, 64)]):  # 1024, 960 and 33 blocks
        W = weight(shape, seed)
        codes, absmax2, offset = ex.quantize_absmax(block_absmax(W))
        _, state = nf4_quantize(W, 64, double_quant=True)
        assert codes.dtype == torch.uint8 and absmax2.dtype == torch.float32
        assert torch.equal(codes, state.absmax), shape
        assert torch.equal(absmax2, state.absmax2) and torch.equal(offset.reshape(()), state.offset.reshape(())), shape


def test_bitsandbytes_stores_the_same(ex):
    """bitsandbytes' quantize_4bit(compress_statistics=True) on the CPU: the same offset and absmax2
    exactly; its approximate search of the map may pick the neighbouring code for a value within a
    hair of a midpoint, so at most 1 % of codes may differ, each by one."""
    W = weight((256, 512), seed=3)
    codes, absmax2, offset = ex.quantize_absmax(block_absmax(W))
    _, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(offset.reshape(()), qs.offset.reshape(())) and torch.equal(absmax2, qs.state2.absmax)
    differ = codes.long() - qs.absmax.long()
    assert differ.abs().max() <= 1 and torch.count_nonzero(differ) <= codes.numel() // 100


def test_reading_back(ex):
    """dequantize_absmax equals state.scales() exactly, and is within one 8-bit step of the true
    absmax: |error| ≤ 0.0106 · absmax2 (the widest half-gap of the map, near ±1)."""
    W = weight((96, 640), seed=4)
    absmax = block_absmax(W)
    codes, absmax2, offset = ex.quantize_absmax(absmax)
    read = ex.dequantize_absmax(codes, absmax2, offset)
    _, state = nf4_quantize(W, 64, double_quant=True)
    assert read.dtype == torch.float32 and torch.equal(read, state.scales())
    group = torch.arange(absmax.numel()) // 256
    assert bool(((read - absmax).abs() <= 0.0106 * absmax2[group] + 1e-9).all())
