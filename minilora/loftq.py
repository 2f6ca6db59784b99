r"""LoftQ (Li et al., 2023): a start for QLoRA that makes the 4-bit base plus the adapter closer to
the full-precision weight than the 4-bit base alone.

QLoRA starts from Q = NF4(W) and B = 0, so at step 0 the model carries the whole quantization
error W − Q. LoftQ instead alternates, for T iterations (Q₀ = NF4(W), B₀A₀ = 0):

    Q_t   = dequant(NF4(W − s·B_{t−1} A_{t−1}))       quantize what the adapter does not carry
    R_t   = W − Q_t                                   the error left to the adapter
    s·B_t A_t = best rank-r approximation of R_t      (SVD: U_r Σ_r V_rᵀ, split √Σ_r between the factors)

and keeps (Q_T, A_T, B_T). Since s·B·A is the rank-r optimum for the final residual,

    ‖W − (Q_T + s·B_T A_T)‖_F ≤ ‖W − Q_T‖_F,

and with T > 1 the quantizer sees a weight from which the adapter has already removed its share.

As in PEFT, the base weight is rewritten with the dequantized Q_T (full precision values that NF4
represents exactly, blocksize 64, no double quantization), and the model is quantized afterwards:
`quantize_model(model, NF4Config(double_quant=False))` then stores exactly Q_T's codes, because
quantizing a dequantized NF4 weight again gives the same bytes (each block's largest value sits on
the level ±1). Unlike PEFT, the factors are divided by s, so Q + s·B·A approximates W whatever
lora_alpha is (PEFT assumes s = 1).
"""

from __future__ import annotations

import torch

from .quant import nf4_dequantize, nf4_quantize

BLOCKSIZE = 64  # the NF4 blocks of the quantized base, as QLoRA and PEFT's LoftQ use


@torch.no_grad()
def loftq(W: torch.Tensor, r: int, scale: float, iterations: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (d_out, d_in) -> (Q dequantized (d_out, d_in) in W's dtype, A (r, d_in), B (d_out, r))."""
    if iterations < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got loftq_iter={iterations}")
    target = W.float()
    adapter = torch.zeros_like(target)  # s·B·A, (d_out, d_in)
    for _ in range(iterations):
        packed, state = nf4_quantize(target - adapter, BLOCKSIZE, double_quant=False)
        Q = nf4_dequantize(packed, state, torch.float32)
        U, S, Vh = torch.linalg.svd(target - Q, full_matrices=False)  # the residual's SVD
        root = (S[:r] / scale).sqrt()  # √(σ / s): s·B·A = U_r Σ_r V_rᵀ
        B, A = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]  # (d_out, r), (r, d_in)
        adapter = scale * (B @ A)
    return Q.to(W.dtype), A, B
