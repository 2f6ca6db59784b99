r"""Linear4bit: a frozen Linear whose weight is stored in NF4 (4-bit codes + block scales).

    y = x · dequant(W)ᵀ + b             computed in `compute_dtype` through minilora.kernels
    ∂L/∂x = ∂L/∂y · dequant(W)          W rebuilt in the backward pass, never kept in between

W never trains (QLoRA freezes the base), so the backward pass needs only the input gradient,
and the dense W exists only for the duration of one product. The product is the custom op
minilora::nf4_matmul, whose backward is minilora::nf4_matmul_grad_input (kernels/ops.py), so
torch.compile(fullgraph=True) traces Linear4bit layers, forward and backward, without a graph
break. LoRA wraps a Linear4bit exactly as it wraps an nn.Linear: that is QLoRA,

    y = x · dequant(W_nf4)ᵀ + b + (α/r) · (x Aᵀ) Bᵀ        A, B in fp32/bf16, trained

GPT-2's Conv1D (weight stored (in, out)) is transposed once, at quantization time, so every
Linear4bit stores (out, in) and computes the same way; `to_float()` restores the original kind.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from minilora.kernels import nf4_dequantize, nf4_matmul

from .nf4 import SCALE_BLOCK, NF4State, check_blocksize, nf4_quantize


@dataclass(frozen=True)
class NF4Config:
    """How to quantize a model's linear layers. Frozen, so a default instance is safe to share;
    derive a variant with dataclasses.replace(config, blocksize=128)."""

    blocksize: int = 64  # values per absmax block (a power of two, 32..4096)
    double_quant: bool = True  # quantize the absmax vector too (4.127 instead of 4.5 bits per weight)
    compute_dtype: Optional[torch.dtype] = None  # dtype of the product; None: the input's dtype

    def __post_init__(self):
        check_blocksize(self.blocksize)
        if self.compute_dtype is not None and not self.compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating dtype, got {self.compute_dtype}")


QUANT_STATE = ("absmax", "absmax2", "offset")  # buffers that a module cast moves but never converts
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # extra state: index into this


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer. Buffers: weight (packed uint8), absmax, absmax2, offset.

    The stored weight never changes after quantization. `model.to(torch.bfloat16)`, `.half()`,
    `.float()` convert the bias and move `compute_dtype` along (when one is set), but leave the
    codes and their fp32 scales as they are; `.to(device)` moves everything. The original dtype
    travels in the state dict (as `_extra_state`), so a reloaded layer computes as the saved one."""

    LINEAR_LIKE = True  # surgery treats it as a Linear: LoRA can wrap it

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: NF4Config = NF4Config(),
                 device=None, dtype: torch.dtype = torch.float32, from_conv1d: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.weight_dtype = dtype  # dtype of the original weight
        self.from_conv1d = from_conv1d  # restore a GPT-2 Conv1D on to_float()
        self.backend = "auto"
        self.requantization_error: Optional[float] = None  # ‖Q(W') − W'‖ / ‖W'‖ when merge_and_unload packed it again
        n_blocks = -(-in_features * out_features // config.blocksize)
        self.register_buffer("weight", torch.zeros((in_features * out_features + 1) // 2, dtype=torch.uint8, device=device))
        dq = config.double_quant
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if dq else torch.float32, device=device))
        self.register_buffer("absmax2", torch.zeros(-(-n_blocks // SCALE_BLOCK), device=device) if dq else None)
        self.register_buffer("offset", torch.zeros((), device=device) if dq else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def _apply(self, fn, recurse=True):
        """Module.to / half / bfloat16 / float / cuda: scales are moved, never converted (buffers, or
        frozen parameters in the shardable layout)."""
        orders = {"_buffers": list(self._buffers), "_parameters": list(self._parameters)}
        held = {name: (kind, getattr(self, kind).pop(name)) for kind in orders for name in QUANT_STATE
                if name in getattr(self, kind)}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.weight.device  # uint8 codes: a dtype cast leaves them, a move takes them along
            for kind, order in orders.items():
                moved = {name: _moved(t, device) for name, (k, t) in held.items() if k == kind}
                current = getattr(self, kind)
                setattr(self, kind, {name: moved[name] if name in moved else current[name] for name in order})
        cast = _cast_dtype(fn, device)
        if cast is not None and self.config.compute_dtype is not None:
            self.config = replace(self.config, compute_dtype=cast)
        return self

    def get_extra_state(self) -> torch.Tensor:
        """The original weight's dtype, as an index into WEIGHT_DTYPES (a tensor: safetensors can hold it)."""
        return torch.tensor(WEIGHT_DTYPES.index(self.weight_dtype), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        index = int(state)
        if not 0 <= index < len(WEIGHT_DTYPES):
            raise ValueError(f"Linear4bit extra state {index} names no dtype; expected 0..{len(WEIGHT_DTYPES) - 1}")
        self.weight_dtype = WEIGHT_DTYPES[index]

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes as nf4_quantize returns them: uint8 [(numel + 1) // 2], whatever the layout."""
        if self.weight.dim() == 1:
            return self.weight
        return self.weight.reshape(-1)[: (self.in_features * self.out_features + 1) // 2]  # drop the padding

    @property
    def state(self) -> NF4State:
        return NF4State(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                        blocksize=self.config.blocksize, double_quant=self.config.double_quant,
                        absmax2=self.absmax2, offset=self.offset)

    @torch.no_grad()
    def make_shardable(self) -> "Linear4bit":
        """The layout FSDP2 shards on block boundaries (in place; idempotent).

            weight   uint8 [n_blocks, blocksize/2]    one row per block (the last padded with code 0)
            absmax   [n_blocks]                       one scale (or scale code) per row of weight
            absmax2  fp32 [ceil(n_blocks/256)]        the scales of the scales (double quant)

        fully_shard cuts parameters along dim 0 only, so each process holds whole blocks and their
        scales, never half a block. They become frozen Parameters (requires_grad=False: FSDP2 shards
        parameters, not buffers; an integer tensor cannot require grad); `offset`, one scalar, stays
        a buffer. The bytes are those of the 1-D layout: `packed` reads them back."""
        if isinstance(self._parameters.get("weight"), nn.Parameter):
            return self
        half, n_blocks = self.config.blocksize // 2, self.absmax.numel()
        codes = torch.zeros(n_blocks * half, dtype=torch.uint8, device=self.weight.device)
        codes[: self.weight.numel()] = self.weight  # (n_bytes,) -> (n_blocks · blocksize/2,)
        for name, tensor in (("weight", codes.view(n_blocks, half)), ("absmax", self.absmax), ("absmax2", self.absmax2)):
            if tensor is not None:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        return self

    @torch.no_grad()
    def set_weight(self, W: torch.Tensor) -> None:
        """Quantize W (out, in) into this layer's buffers."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(W.shape)} does not fit Linear4bit({self.in_features}, {self.out_features})")
        packed, state = nf4_quantize(W, self.config.blocksize, self.config.double_quant)
        self.weight, self.absmax = packed, state.absmax
        self.absmax2, self.offset = state.absmax2, state.offset
        self.weight_dtype = W.dtype

    @classmethod
    def from_float(cls, module: nn.Module, config: NF4Config = NF4Config()) -> "Linear4bit":
        """Quantize an nn.Linear or a GPT-2 Conv1D."""
        conv1d = not isinstance(module, nn.Linear)
        W = module.weight.detach()
        W = W.t() if conv1d else W  # Conv1D stores (in, out): quantize (out, in) like a Linear
        layer = cls(W.shape[1], W.shape[0], bias=module.bias is not None, config=config, device=W.device,
                    dtype=W.dtype, from_conv1d=conv1d)
        layer.set_weight(W)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W_hat (out, in)."""
        return nf4_dequantize(self.packed, self.state, dtype or self.weight_dtype, self.backend)

    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The dequantized layer, as the kind it was quantized from (nn.Linear or Conv1D)."""
        W = self.dequantized_weight(dtype)
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(W.t().contiguous(), requires_grad=False)
            layer.bias = nn.Parameter(self.bias.detach().clone().to(W.dtype), requires_grad=False) if self.bias is not None \
                else nn.Parameter(torch.zeros(self.out_features, dtype=W.dtype), requires_grad=False)
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=W.device, dtype=W.dtype)
        layer.weight.data.copy_(W)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
        return layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.config.compute_dtype or x.dtype
        y = nf4_matmul(x.to(compute), self.packed, self.state, self.backend)  # (..., in) @ (in, out) -> (..., out)
        if self.bias is not None:
            y = y + self.bias.to(compute)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.config.double_quant else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize={self.config.blocksize}{dq}"


def _moved(tensor: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A scale tensor on `device`, kept a frozen Parameter if it was one."""
    if tensor is None:
        return None
    if isinstance(tensor, nn.Parameter):
        return tensor if tensor.device == device else nn.Parameter(tensor.data.to(device), requires_grad=False)
    return tensor.to(device)


def _cast_dtype(fn, device: torch.device) -> Optional[torch.dtype]:
    """The floating dtype that `fn` (what Module._apply applies) converts every float tensor to,
    or None when it keeps dtypes (a move): fp32 and fp16 probes end in one dtype only under a cast."""
    a = fn(torch.zeros((), dtype=torch.float32, device=device))
    b = fn(torch.zeros((), dtype=torch.float16, device=device))
    return a.dtype if a.dtype == b.dtype else None
