r"""# Exercise 5: NF4 quantization by hand

*Chapter 5 of the tutorial (`docs/tutorial.md`, "NF4 and double quantization").*

NF4 (Dettmers et al., 2023) stores each weight in 4 bits. Its 16 levels $\ell_0 < \dots < \ell_{15}$
are quantiles of a standard normal rescaled to $[-1, 1]$, with $\ell_0 = -1$, $\ell_7 = 0$ exactly,
$\ell_{15} = 1$ (`minilora.quant.NF4_LEVELS`). To quantize $W$:

1. **Flatten** $W$ row-major and cut it into blocks of 64 values.
2. **Scale** each block by its absmax $a = \max_i |w_i|$: $u_i = w_i \cdot (1/a)$. (bitsandbytes
   multiplies by the fp32 reciprocal $1/a$ rather than dividing; do the same and your bytes are
   bitsandbytes' bytes.) Every $u_i$ lies in $[-1, 1]$.
3. **Round** each $u_i$ to the nearest level: code $c_i = \arg\min_j |u_i - \ell_j|$. Equivalently,
   with the 15 midpoints $m_j = (\ell_j + \ell_{j+1})/2$, $c_i$ is the number of midpoints below
   $u_i$ (`torch.bucketize(u, m)`); a value exactly on a midpoint takes the lower code.
4. **Pack** two 4-bit codes per byte, in bitsandbytes' order: the first of each pair in the
   **high** nibble, $\text{byte}_k = 16\,c_{2k} + c_{2k+1}$.

Dequantization reads $\hat w_i = \ell_{c_i} \cdot a$ (in fp32). The error of each weight is at most
half the gap between its two neighbouring levels, times its block's absmax.

Storage: 4 bits per weight plus one fp32 absmax per 64 weights, $4 + 32/64 = 4.5$ bits per weight.

## Your task

1. `quantize_nf4(W, blocksize=64)`: `(packed, absmax)`, `packed` uint8 of `W.numel() // 2` bytes,
   `absmax` fp32 of one value per block. You may assume `W.numel()` is a multiple of `blocksize`.
2. `dequantize_nf4(packed, absmax, shape, blocksize=64)`: $\hat W$ in fp32, of `shape`.

The tests compare your bytes with `bitsandbytes.functional.quantize_4bit` (on the CPU) and with
`minilora.quant.nf4_quantize`, and your dequantized values with `minilora.quant.nf4_dequantize`.

Run: `pytest docs/exercises/test_ex05_nf4.py`
"""

import torch

from minilora.quant import NF4_LEVELS


def quantize_nf4(W: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (packed uint8 [numel/2], absmax fp32 [numel/blocksize])."""
    raise NotImplementedError(
        "reshape to (-1, blocksize); absmax per row; multiply by (1.0 / absmax); torch.bucketize against the "
        "midpoints of NF4_LEVELS; pack (codes[0::2] << 4) | codes[1::2] as uint8")


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64) -> torch.Tensor:
    """(packed, absmax) -> W_hat fp32 of `shape`: level × block absmax."""
    raise NotImplementedError("unpack the high nibble (>> 4) then the low one (& 0xF); NF4_LEVELS[codes] × absmax")
