"""Tier 2, oracle: the Triton kernels against their torch references. Without a GPU they run on
CPU tensors through Triton's interpreter (set up in conftest.py), on small shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.kernels import nf4_dequantize, nf4_dequantize_reference, nf4_matmul, nf4_matmul_grad_input
from minilora.kernels.dispatch import TRITON_KERNELS, interpreting
from minilora.quant import Linear4bit, NF4Config, nf4_quantize

pytestmark = pytest.mark.skipif(not TRITON_KERNELS, reason="triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def quantized(shape, blocksize=64, double_quant=True, seed=0):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, state = nf4_quantize(W, blocksize, double_quant, native=False)
    return packed.to(DEVICE), state.to(DEVICE)


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """What the interpreter does to fp32 → bf16: drop the low 16 bits (a GPU rounds instead)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(33, 17), (64, 96), (7,), (5, 129), (130, 64)])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_is_bit_exact(shape, blocksize, double_quant):
    packed, state = quantized(shape, blocksize, double_quant)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = nf4_dequantize(packed, state, dtype, backend="triton")
        expected = nf4_dequantize_reference(packed, state, dtype)
        if dtype == torch.bfloat16 and interpreting():
            expected = truncate_to_bf16(nf4_dequantize_reference(packed, state, torch.float32))
        assert got.shape == tuple(shape) and torch.equal(got, expected), dtype


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 700), blocksize=st.sampled_from([32, 64]), double_quant=st.booleans(), seed=st.integers(0, 99))
def test_dequant_property(n, blocksize, double_quant, seed):
    packed, state = quantized((n,), blocksize, double_quant, seed)
    assert torch.equal(nf4_dequantize(packed, state, torch.float32, backend="triton"),
                       nf4_dequantize_reference(packed, state, torch.float32))


@pytest.mark.parametrize("M, N, K", [(1, 96, 130), (5, 40, 72), (17, 33, 64), (40, 64, 100)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matmul_and_its_backward_match_the_reference(M, N, K, double_quant):
    packed, state = quantized((N, K), 64, double_quant)
    x = torch.randn(M, K, device=DEVICE)
    g = torch.randn(M, N, device=DEVICE)
    torch.testing.assert_close(nf4_matmul(x, packed, state, backend="triton"),
                               nf4_matmul(x, packed, state, backend="torch"), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nf4_matmul_grad_input(g, packed, state, backend="triton"),
                               nf4_matmul_grad_input(g, packed, state, backend="torch"), atol=1e-5, rtol=1e-4)
    x3 = torch.randn(2, 3, K, device=DEVICE)  # leading dimensions are kept
    assert nf4_matmul(x3, packed, state, backend="triton").shape == (2, 3, N)


def test_autograd_through_linear4bit_gives_the_reference_gradients():
    torch.manual_seed(0)
    dense = torch.nn.Linear(72, 40).to(DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        layer = Linear4bit.from_float(dense, NF4Config(blocksize=64))
        layer.backend = backend
        torch.manual_seed(1)
        x = torch.randn(6, 72, device=DEVICE).requires_grad_()
        y = layer(x)
        (y * torch.arange(40, device=DEVICE)).sum().backward()
        grads[backend] = (y.detach(), x.grad)
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1], atol=1e-5, rtol=1e-4)


def test_auto_picks_the_reference_for_cpu_tensors_and_triton_refuses_bad_backends():
    packed, state = quantized((32, 64))
    if not CUDA:
        x = torch.randn(3, 64)
        assert torch.equal(nf4_matmul(x, packed, state), nf4_matmul(x, packed, state, backend="torch"))
    with pytest.raises(ValueError, match="backend must be one of"):
        nf4_dequantize(packed, state, backend="cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: bf16 rounding and speed on the GPU")
def test_cuda_bf16_dequant_is_bit_exact_and_matmul_is_close():
    packed, state = quantized((4096, 1024))
    assert torch.equal(nf4_dequantize(packed, state, torch.bfloat16, backend="triton"),
                       nf4_dequantize_reference(packed, state, torch.bfloat16))
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(nf4_matmul(x, packed, state, backend="triton"),
                               nf4_matmul(x, packed, state, backend="torch"), atol=5e-2, rtol=2e-2)
