"""minilora.kernels: NF4 kernels, one file per kernel, each with its torch reference beside it.

    nf4_dequant(packed, state, dtype, backend="auto")      packed NF4 -> dense weight
    nf4_matmul(x, packed, state, backend="auto")           y = x · dequant(W)ᵀ
    nf4_matmul_grad_input(grad_y, packed, state, ...)      x_grad = y_grad · dequant(W)

`backend` is "auto" (Triton for CUDA tensors when a Triton kernel is available, the torch
reference otherwise), "torch" or "triton". A missing Triton or GPU is never an error under "auto".
The three are PyTorch custom ops (ops.py: torch.ops.minilora.nf4_dequant, .nf4_matmul,
.nf4_matmul_grad_input) with fake implementations and autograd: differentiable in x, and traced
by torch.compile(fullgraph=True) without a graph break.

This folder sits at the top of the repository but installs as `minilora.kernels` (see
pyproject.toml's package-dir): a top-level module named `kernels` would shadow Hugging Face's
unrelated `kernels` package, which transformers and bitsandbytes import.
"""

from .nf4_dequant import nf4_dequant_reference
from .nf4_matmul import nf4_matmul_grad_input_reference, nf4_matmul_reference
from .ops import nf4_dequant, nf4_matmul, nf4_matmul_grad_input

__all__ = [
    "nf4_dequant",
    "nf4_dequant_reference",
    "nf4_matmul",
    "nf4_matmul_grad_input",
    "nf4_matmul_grad_input_reference",
    "nf4_matmul_reference",
]
