r"""The NF4 storage format with double-quantized scales, and its plain-PyTorch reference; same bytes as bitsandbytes.

This module is the bottom of the quantization stack: it imports nothing of minilora's. The kernels
(minilora.kernels: native CPU loop, Triton) build on it, and the public `nf4_quantize` /
`nf4_dequantize` (minilora/quant/nf4.py) pick between the kernels and the reference here.

NF4 (Dettmers et al., 2023, "QLoRA", section 3) has 16 levels placed at quantiles of a standard
normal, rescaled to [-1, 1] with an exact zero; a weight in a block of `blocksize` values is
stored as the 4-bit index of the level nearest to w / absmax(block):

    W (out, in) ──flatten row-major──► blocks of 64 ──÷ absmax──► nearest of 16 levels ──► 4 bits
    two codes per byte, the first element in the high nibble; an odd count is padded (code of 0.0)

Double quantization (section 3, "Double Quantization") stores the fp32 absmax vector itself in
8 bits: subtract its mean (the `offset`), cut it into blocks of 256, scale each block by its own
absmax (`absmax2`, fp32) and map to the nearest of bitsandbytes' 256-entry signed dynamic map.

    bits per weight = 4 + 32/64                  = 4.5     without double quant
                    = 4 + 8/64 + 32/(64·256)     ≈ 4.127   with it

Dequantization is `level × absmax` in fp32, rounded once to the target dtype; with double quant
absmax = dynamic_map[q] × absmax2 + offset, in fp32, first. bitsandbytes' CPU path computes
exactly this, so each library reads the other's weights to identical values.

Shape legend: n = numel(W), n_blocks = ceil(n / blocksize), n_blocks2 = ceil(n_blocks / 256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

# The 16 NF4 levels (QLoRA, appendix E), sorted; index 7 is the exact zero.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
SCALE_BLOCK = 256  # block size of the second quantization (of absmax)
BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 ... 4096


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers, 2016), 256 sorted fp32 values in [-1, 1],
    built exactly as bitsandbytes builds it for its GPU path and saves it in its checkpoints.

    For each decade e = 0..6: the 2^e midpoints of 2^e + 1 evenly spaced points on [0.1, 1],
    scaled by 10^(e-6), with both signs (127 magnitudes from ~5.5e-7 to ~0.993); then 0 and 1.
    The most negative entry is therefore -0.99297, not -1.0: a scale group's most negative
    value, stored as code 0, reads back 0.7 % small. Both libraries must read code 0 the same
    way, so minilora decodes with bitsandbytes' entry rather than a "better" -1.0. (Encoding is
    another matter: bitsandbytes' CPU quantizer searches a copy whose entry 0 is -1.0, and so do
    the decision boundaries below, so the bytes stay bitsandbytes' too.)
    """
    values = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1)  # fp32, like every step below
        midpoints = (grid[:-1] + grid[1:]) / 2
        values += ((10 ** (e - 6)) * midpoints).tolist() + (-(10 ** (e - 6)) * midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


def _midpoints(levels: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring levels; a value on a boundary takes the lower code."""
    return (levels[:-1] + levels[1:]) / 2


NF4_BOUNDS = _midpoints(NF4_LEVELS)
_DYNAMIC_BOUNDS = _midpoints(torch.cat([torch.tensor([-1.0]), DYNAMIC_MAP[1:]]))  # see dynamic_map()


@dataclass
class NF4State:
    """Everything besides the packed codes that dequantization needs."""

    absmax: torch.Tensor  # fp32 [n_blocks]; uint8 [n_blocks] codes into DYNAMIC_MAP with double quant
    shape: torch.Size  # the original weight's shape
    dtype: torch.dtype  # the original weight's dtype (the default dequantization dtype)
    blocksize: int  # values per block (a power of two, 32..4096)
    double_quant: bool  # whether absmax is itself quantized
    absmax2: Optional[torch.Tensor] = None  # fp32 [n_blocks2]: per-SCALE_BLOCK scale of (absmax - offset)
    offset: Optional[torch.Tensor] = None  # fp32 scalar: mean of absmax, subtracted before quantizing it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device) -> "NF4State":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), absmax2=move(self.absmax2), offset=move(self.offset))

    def scales(self) -> torch.Tensor:
        """The fp32 absmax per block: (n_blocks,)."""
        if not self.double_quant:
            return self.absmax
        code = DYNAMIC_MAP.to(self.absmax.device)[self.absmax.long()]  # (n_blocks,)
        blocks2 = torch.arange(self.n_blocks, device=code.device) // SCALE_BLOCK
        return code * self.absmax2[blocks2] + self.offset

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.absmax, self.absmax2, self.offset) if t is not None)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        extra = (" (bitsandbytes accepts 16 on some paths; minilora's kernels tile in blocks of at least 32: "
                 "use 32 for the finest scales)") if blocksize == 16 else ""
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}{extra}")


def blockwise_absmax_scale(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (n_blocks,) and the values scaled into [-1, 1] (n,), bitsandbytes' way:
    full blocks multiply by the fp32 reciprocal, a partial last block divides."""
    n = A.numel()
    full = n - n % blocksize
    body = A[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail_max = A[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (A[full:] / tail_max).clamp_(-1, 1)])
    return absmax, scaled


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quant: (codes uint8 [n_blocks], absmax2 fp32 [n_blocks2], offset fp32 scalar).

        offset = mean(absmax);  x = absmax - offset, cut into groups of SCALE_BLOCK
        absmax2[g] = max |x| over group g;  code = nearest entry of the dynamic map to x / absmax2[g]

    Where the bytes are bitsandbytes' (its CPU quantize_4bit(compress_statistics=True), probed on
    0.50.2), one group of SCALE_BLOCK scales at a time:
      absmax2 > 2^-128 (≈ 2.938736e-39)  the same codes, but where bitsandbytes' approximate search
                               misses the nearest entry: one code apart (~0.1 % of scales; docs/qlora.md),
                               up to four for centred values within 5.5e-6 · absmax2 of zero (a
                               scale equal to the mean: code 131, 2.1e-5 · absmax2, not 127, 0.0)
      absmax2 = 0 (all equal to their mean)  every code 0, as bitsandbytes writes (any code reads
                               back code × 0 + offset = the exact scale)
      0 < absmax2 <= 2^-128    bitsandbytes multiplies by the fp32 1 / absmax2, which rounds to inf
                               there, and writes 255 for x > 0 and 0 for x <= 0 whatever the values
                               (a partial last group too); minilora divides, keeps each scale within
                               its 8-bit step, and its codes differ (by up to 127). Both libraries
                               read either's bytes to the same values: only the writing differs.
    A mean that overflows fp32 (scales near 3.4e38) is an error: no stored offset could read back."""
    offset = absmax.mean()
    centered = absmax - offset  # (n_blocks,)
    n = centered.numel()
    blocks2 = -(-n // SCALE_BLOCK)
    padded = torch.nn.functional.pad(centered, (0, blocks2 * SCALE_BLOCK - n)).view(blocks2, SCALE_BLOCK)
    absmax2 = padded.abs().amax(dim=1)  # (n_blocks2,)
    check_double_quant_scales(absmax, absmax2, offset)
    flat = absmax2.unsqueeze(1) == 0  # (n_blocks2, 1): a group with nothing to scale
    normed = padded / torch.where(flat, torch.ones_like(absmax2).unsqueeze(1), absmax2.unsqueeze(1))
    codes = torch.bucketize(normed.view(-1)[:n], _DYNAMIC_BOUNDS.to(normed.device), out_int32=True)
    codes = codes.masked_fill(flat.expand(-1, SCALE_BLOCK).reshape(-1)[:n], 0)
    return codes.to(torch.uint8), absmax2, offset


def check_double_quant_scales(absmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> None:
    """The second-level scales of finite block scales are finite, or double quant cannot store them:
    the fp32 mean (offset) or a centred value overflows when the block scales approach 3.4e38."""
    if not (bool(torch.isfinite(offset)) and bool(torch.isfinite(absmax2).all())):
        raise ValueError(
            f"double quant cannot store block scales up to {absmax.abs().max().item():.3e}: their fp32 mean "
            f"(the offset) or a centred scale overflows (offset {offset.item()}). Quantize without double "
            "quant (double_quant=False), or rescale the weight"
        )


def pack_reference(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: (n,) fp32 -> packed uint8 [(n+1)//2], absmax fp32 [n_blocks]."""
    absmax, scaled = blockwise_absmax_scale(A, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad takes 0.0's code
    q = torch.bucketize(scaled, NF4_BOUNDS.to(A.device), out_int32=True).to(torch.uint8)  # nearest level
    return (q[0::2] << 4) | q[1::2], absmax  # first element in the high nibble


def check_state(packed: torch.Tensor, state: NF4State) -> None:
    """Every length and dtype of (packed, state) against the shape and blocksize it describes, read
    from the tensors' sizes only (no data is read, so it is cheap enough for every call). Each reader
    of stored weights runs this, and `check_scales`, before it allocates or computes anything."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed NF4 codes must be uint8, got {packed.dtype}")
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"the state's blocksize is {state.blocksize!r}; NF4 blocks are a power of two from 32 to 4096")
    if any(int(d) < 0 for d in state.shape):
        raise ValueError(f"the state describes a negative shape {tuple(state.shape)}")
    if packed.numel() != (state.numel + 1) // 2:
        raise ValueError(
            f"the packed codes hold {packed.numel()} bytes but the state describes shape {tuple(state.shape)} "
            f"({state.numel} values = {(state.numel + 1) // 2} bytes): packed and state do not belong together"
        )
    expected = torch.uint8 if state.double_quant else torch.float32
    if state.absmax.dtype != expected:
        what = "uint8 codes (double quant)" if state.double_quant else "fp32 scales (no double quant)"
        raise TypeError(f"the block scales must be {what}, got {state.absmax.dtype}")
    if state.absmax.numel() != state.n_blocks:
        raise ValueError(
            f"the state has {state.absmax.numel()} block scales but shape {tuple(state.shape)} with blocksize "
            f"{state.blocksize} has {state.n_blocks} blocks"
        )
    if state.double_quant:
        if state.absmax2 is None or state.offset is None:
            raise ValueError("a double-quantized state needs absmax2 (the scales' scales) and offset; one is missing")
        if state.absmax2.dtype != torch.float32 or state.offset.dtype != torch.float32:
            raise TypeError(f"absmax2 and offset must be fp32, got {state.absmax2.dtype} and {state.offset.dtype}")
        groups = -(-state.n_blocks // SCALE_BLOCK)
        if state.absmax2.numel() != groups:
            raise ValueError(f"absmax2 holds {state.absmax2.numel()} values but {state.n_blocks} blocks in groups of "
                             f"{SCALE_BLOCK} need {groups}")
        if state.offset.numel() != 1:
            raise ValueError(f"offset must be one value, got {state.offset.numel()}")


def check_scales(state: NF4State) -> None:
    """The stored scales are finite (reads them once: for loaders, not for every forward pass)."""
    for name in ("absmax", "absmax2", "offset") if state.double_quant else ("absmax",):
        values = getattr(state, name)
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"{name} holds {bad} NaN or infinite value(s): the weight cannot be read back")


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [(n+1)//2] -> codes int64 [n] (high nibble first)."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1)  # (2 · bytes,)
    return codes[:numel].long()


def unpack_reference(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch dequantization: (packed, state) -> W_hat of state.shape in `dtype`."""
    levels = NF4_LEVELS.to(packed.device)[unpack(packed.reshape(-1), state.numel)]  # (n,) fp32
    scales = state.scales()  # (n_blocks,) fp32
    n, bs = state.numel, state.blocksize
    full = n - n % bs
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (levels[:full].view(-1, bs) * scales[: full // bs].unsqueeze(1)).view(-1)
    if full < n:
        out[full:] = levels[full:] * scales[-1]
    return out.view(state.shape).to(dtype)
