"""minilora.kernels: NF4 kernels, one file per kernel, each with its torch reference beside it.

    nf4_dequantize(packed, state, dtype, backend="auto")   packed NF4 -> dense weight (quant's name;
                                                           `nf4_dequant`, the earlier one, still works)
    nf4_matmul(x, packed, state, backend="auto")           y = x · dequant(W)ᵀ
    nf4_matmul_grad_input(grad_y, packed, state, ...)      x_grad = y_grad · dequant(W)

`backend` is "auto" (Triton for CUDA tensors when a Triton kernel is available, the torch
reference otherwise), "torch" or "triton". A missing Triton or GPU is never an error under "auto".
The three are PyTorch custom ops (ops.py: torch.ops.minilora.nf4_dequant, .nf4_matmul,
.nf4_matmul_grad_input) with fake implementations and autograd: differentiable in x, and traced
by torch.compile(fullgraph=True) without a graph break.

Where the files are. The kernels live in the repository's top-level kernels/ folder, one file per
kernel. That folder has no __init__.py on purpose: Python started in a checkout has the root on
sys.path, and Hugging Face's unrelated `kernels` package (which transformers and bitsandbytes
import) must win there. A folder without __init__.py is only a namespace portion, and any installed
package of the same name takes precedence over it. This module is the package: its __path__ is that
folder, which a wheel installs as minilora/kernels/ (pyproject.toml's package-dir) and a checkout
keeps at ../kernels.
"""

from pathlib import Path as _Path

_HERE = _Path(__file__).resolve()
__path__ = [str(folder) for folder in (_HERE.with_suffix(""), _HERE.parents[1] / "kernels")  # installed, checkout
            if (folder / "ops.py").is_file()][:1]

from minilora.kernels.nf4_dequantize_kernel import nf4_dequantize_reference  # noqa: E402 - needs __path__ above
from minilora.kernels.nf4_matmul_kernel import nf4_matmul_grad_input_reference, nf4_matmul_reference  # noqa: E402
from minilora.kernels.ops import nf4_dequantize, nf4_matmul, nf4_matmul_grad_input  # noqa: E402

__all__ = [
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_matmul",
    "nf4_matmul_grad_input",
    "nf4_matmul_grad_input_reference",
    "nf4_matmul_reference",
]


def __getattr__(name):
    from minilora import renamed

    return renamed.earlier_name(__name__, name, {"nf4_dequant": "nf4_dequantize",
                                                 "nf4_dequant_reference": "nf4_dequantize_reference"}, globals(),
                                why="one name with minilora.quant.nf4_dequantize")
