r"""Initialisations of A and B other than LoRA's B = 0: PiSSA, OLoRA and orthogonal (PEFT's names).

Notation as in lora.py: W ∈ R^{d_out × d_in} (a Conv1D's weight is Wᵀ), A ∈ R^{r × d_in},
B ∈ R^{d_out × r}, s = alpha / r (or alpha / √r with rsLoRA). Each start keeps the layer's function
at step 0: it either moves part of W into s·B·A and leaves the rest as the base,

    W_res = W − s·B·A            so that      W_res + s·B·A = W                         (PiSSA, OLoRA)

or picks A and B with B·A = 0 (orthogonal). The first kind changes the base weight, so it needs a
full-precision weight of a whole layer: a quantized base would not round-trip W_res exactly, and a
slice of a fused layer (one part of GPT-2's c_attn) is not a matrix of its own to factorise.

PiSSA (Meng, Wang and Zhang, 2024). With the SVD W = U Σ Vᵀ, the principal r triplets (U_r, Σ_r, V_r)
hold most of W's energy. Split Σ_r / s evenly between the factors:

    A = diag(√(Σ_r / s)) V_rᵀ        B = U_r diag(√(Σ_r / s))        ⇒  s·B·A = U_r Σ_r V_rᵀ

so training updates the principal subspace and W_res = Σ_{i>r} σ_i u_i v_iᵀ stays frozen.
"pissa_niter_K" computes (U_r, Σ_r, V_r) by randomized SVD (Halko et al., `torch.svd_lowrank` with K
power iterations): much faster on large layers, the same up to the method's error.

OLoRA (Büyükakyüz, 2024). With the reduced QR decomposition W = Q R (Q orthonormal columns, R upper
trapezoidal), take the first r columns of Q and rows of R:

    B = Q_{:, :r}        A = R_{:r, :}          W_res = W − s·B·A

B starts orthonormal, which the paper finds speeds up convergence.

Orthogonal. Draw an r × r orthogonal matrix Q (QR of a Gaussian matrix) and split its rows into the
odd ones Q_o and the even ones Q_e (r/2 each, so r must be even). With Gaussian G_A ∈ R^{d_in × r/2}
and G_B ∈ R^{d_out × r/2}:

    A = (G_A Q_o)ᵀ / 10        B = G_B Q_e / 10        ⇒  B·A = G_B (Q_e Q_oᵀ) G_Aᵀ / 100 = 0

because distinct rows of an orthogonal matrix are orthogonal: both factors start non-zero (both
receive gradients at once) while the layer's output is unchanged. W is not touched.

Random draws use torch's global generator in PEFT's order, so a seed gives PEFT's A and B.
"""

from __future__ import annotations

import re

import torch

from .loftq import loftq
from .roles import FULL

NAMED = re.compile(r"pissa(_niter_\d+)?|olora|orthogonal|loftq(_iter_\d+)?")  # the values of init_lora_weights handled here


def is_named(init_lora_weights) -> bool:
    """Whether `init_lora_weights` names an initialisation of this file."""
    return isinstance(init_lora_weights, str) and NAMED.fullmatch(init_lora_weights) is not None


def changes_base(init_lora_weights) -> bool:
    """Whether the initialisation rewrites the base weight (PiSSA, OLoRA)."""
    return is_named(init_lora_weights) and init_lora_weights != "orthogonal"


def pissa(W: torch.Tensor, r: int, scale: float, niter: int | None = None):
    """(A, B, W_res) from the top r singular triplets of W (d_out, d_in), in fp32. `niter`: use
    randomized SVD with that many power iterations instead of the full SVD."""
    W = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)  # (d_out, r), (r,), (d_in, r)
        Vh = V.t()
    root = torch.sqrt(S / scale)  # (r,)
    A = root[:, None] * Vh  # diag(√(Σ_r/s)) V_rᵀ: (r, d_in)
    B = U * root[None, :]  # U_r diag(√(Σ_r/s)): (d_out, r)
    return A, B, W - scale * (B @ A)


def olora(W: torch.Tensor, r: int, scale: float):
    """(A, B, W_res) from the reduced QR decomposition of W (d_out, d_in), in fp32."""
    W = W.float()
    Q, R = torch.linalg.qr(W)  # (d_out, k), (k, d_in)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, W - scale * (B @ A)


def orthogonal(d_in: int, d_out: int, r: int):
    """(A, B) with A (r, d_in), B (d_out, r), both non-zero and B·A = 0; r even."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}; use r={r + 1} or r={r - 1}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))  # (r, r), orthogonal
    A = (torch.randn(d_in, r // 2) @ Q[0::2]).t() / 10.0  # ((d_in, r/2) @ (r/2, r))ᵀ -> (r, d_in)
    B = torch.randn(r // 2, d_out).t() @ Q[1::2] / 10.0  # (d_out, r/2) @ (r/2, r) -> (d_out, r)
    return A.contiguous(), B.contiguous()


@torch.no_grad()
def initialise(layer, name: str, method: str) -> None:
    """Set A and B of adapter `name` of `layer` (a LoraLinear, which calls this) by `method` (see
    the module docstring); PiSSA and OLoRA also replace the base weight W by W_res."""
    parts = layer.parts[name]
    if list(parts) != [FULL]:
        raise ValueError(
            f"init_lora_weights={method!r} needs a whole layer, but this adapter covers slices "
            f"({', '.join(parts)}) of a fused layer; target the layer by its module name (e.g. 'c_attn') "
            "or use init_lora_weights=True"
        )
    r, scale = parts[FULL].r, layer.part_scale(name, FULL)
    if method == "orthogonal":
        A, B = orthogonal(layer.in_features, layer.out_features, r)
        layer.set_factors(name, FULL, A, B)
        return
    weight = layer.base_layer.weight
    if not weight.is_floating_point():
        raise ValueError(
            f"init_lora_weights={method!r} rewrites the base weight, which is quantized here; initialise on the "
            "full-precision model, then quantize the residual model (quantize_model), or use init_lora_weights=True"
        )
    W = weight.t() if layer.fan_in_fan_out else weight  # (d_out, d_in)
    if r > min(W.shape):
        raise ValueError(
            f"init_lora_weights={method!r} with r={r} on a {tuple(W.shape)} weight: r may be at most "
            f"min(d_out, d_in) = {min(W.shape)}; lower r (or rank_pattern for this layer)"
        )
    if method.startswith("loftq"):  # the base becomes the dequantized NF4 weight: see loftq.py
        iterations = int(method.rsplit("_", 1)[1]) if "_iter_" in method else 1
        W_res, A, B = loftq(W, r, scale, iterations)
    elif method == "olora":
        A, B, W_res = olora(W, r, scale)
    else:
        niter = int(method.rsplit("_", 1)[1]) if "_niter_" in method else None
        A, B, W_res = pissa(W, r, scale, niter)
    layer.set_factors(name, FULL, A, B)
    weight.copy_(W_res.t() if layer.fan_in_fan_out else W_res)
