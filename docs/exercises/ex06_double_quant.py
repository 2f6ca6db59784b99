r"""# Exercise 6: double quantization of the block scales

*Chapter 5 of the tutorial (`docs/tutorial.md`, "NF4 and double quantization").*

NF4 keeps one fp32 absmax per block of 64 weights: $32/64 = 0.5$ extra bits per weight. Double
quantization (QLoRA, section 3) stores those absmax values themselves in 8 bits, the way
bitsandbytes does (`quantize_4bit(..., compress_statistics=True)`):

1. **Centre**: $o = \mathrm{mean}(a)$ over all block absmaxes $a_1 \dots a_n$ (the `offset`, one fp32),
   $x_i = a_i - o$.
2. **Group** the $x_i$ in groups of 256 (the last one may be shorter); each group $g$ keeps
   $a^{(2)}_g = \max_{i \in g} |x_i|$ (`absmax2`, fp32).
3. **Code** each $x_i / a^{(2)}_g \in [-1, 1]$ as the index of the nearest entry of bitsandbytes'
   signed 8-bit dynamic map, 256 sorted values (`minilora.quant.DYNAMIC_MAP`). One detail makes the
   bytes bitsandbytes': its search treats entry 0 (which is $-0.99297$) as $-1.0$. So search the
   midpoints of `[-1.0, DYNAMIC_MAP[1], ..., DYNAMIC_MAP[255]]` (`torch.bucketize`, a value on a
   midpoint takes the lower code), and divide by $a^{(2)}_g$ (do not multiply by a reciprocal here).
4. **Read back**: $\hat a_i = \mathrm{map}[c_i] \cdot a^{(2)}_{g(i)} + o$, in fp32, with the real map.

Bits per weight, for blocks of 64 and scale groups of 256:

$$ 4 + \frac{32}{64} = 4.5 \quad\longrightarrow\quad 4 + \frac{8}{64} + \frac{32}{64 \cdot 256} \approx 4.127 $$

(plus one 32-bit offset per tensor, nothing for a large one).

## Your task

1. `storage_bytes(numel, blocksize=64, double_quant=True)`: the exact bytes a weight of `numel`
   values takes: the packed codes ($\lceil n/2 \rceil$) plus the scales (fp32 absmax; or uint8
   codes + fp32 absmax2 per 256 blocks + one fp32 offset). A partial last block has a scale too.
2. `quantize_absmax(absmax)`: `(codes uint8, absmax2 fp32, offset fp32 scalar)`. You may assume no
   group has all its scales equal to the mean.
3. `dequantize_absmax(codes, absmax2, offset)`: the fp32 absmax read back.

The tests compare with what `minilora.quant.nf4_quantize(W, 64, double_quant=True)` stores
(`state.absmax` holds the codes, `state.absmax2`, `state.offset`; `state.scales()` reads them back),
with bitsandbytes' `quantize_4bit(..., compress_statistics=True)`, and with measured storage.

Run: `pytest docs/exercises/test_ex06_double_quant.py`
"""

import torch

from minilora.quant import DYNAMIC_MAP

SCALE_BLOCK = 256  # scales per group of the second quantization


def storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of the packed codes plus the block scales of an NF4 weight of `numel` values."""
    raise NotImplementedError(
        "ceil(numel / 2) bytes of codes, ceil(numel / blocksize) scales, then the scales' own cost")


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax (n_blocks,) -> (codes uint8 (n_blocks,), absmax2 fp32 (n_groups,), offset fp32 ())."""
    raise NotImplementedError(
        "offset = absmax.mean(); pad absmax - offset to a multiple of 256 and view (groups, 256); absmax2 per row; "
        "bucketize x / absmax2 against the midpoints of [-1.0, *DYNAMIC_MAP[1:]]")


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """map[code] · absmax2[group] + offset, fp32."""
    raise NotImplementedError("DYNAMIC_MAP[codes.long()] * absmax2[index // 256] + offset")
