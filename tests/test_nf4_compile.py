"""The NF4 custom ops: differentiable in x on every backend, checked by torch.library.opcheck, and
traced by torch.compile(fullgraph=True) as one graph, forward and backward."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from minilora.kernels import nf4_dequantize, nf4_dequantize_reference, nf4_matmul, nf4_matmul_grad_input
from minilora.kernels.dispatch import TRITON_KERNELS
from minilora.kernels.ops import nf4_dequant_op, nf4_matmul_grad_input_op, nf4_matmul_op, state_args
from minilora.quant import Linear4bit, NF4Config, nf4_quantize, quantize_model

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_KERNELS, reason="triton is not installed"))]
N, K = 40, 100  # neither a multiple of the 64-value block; N·K = 4000 is not either of 256·64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def quantized(double_quant=True, shape=(N, K)):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    return nf4_quantize(W, 64, double_quant, native=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matmul_is_differentiable_in_x_with_the_reference_gradient(backend, double_quant):
    packed, state = quantized(double_quant)
    W_hat = nf4_dequantize_reference(packed, state, torch.float32)  # (N, K)
    x = torch.randn(2, 3, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 3, N)
    y = nf4_matmul(x, packed, state, backend)  # (2, 3, K) @ (K, N) -> (2, 3, N)
    y.backward(g)
    (x_ref @ W_hat.t()).backward(g)
    torch.testing.assert_close(y.detach(), x_ref.detach() @ W_hat.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    # the grad-input op is differentiable too: its gradient is the forward product
    g2 = g.clone().requires_grad_()
    nf4_matmul_grad_input(g2, packed, state, backend).backward(x_ref.detach())
    torch.testing.assert_close(g2.grad, x_ref.detach() @ W_hat.t(), atol=1e-5, rtol=1e-5)


def test_gradcheck_and_gradgradcheck_in_float64():
    packed, state = quantized(shape=(7, 9))
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    f = lambda x: nf4_matmul(x, packed, state, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck(backend, double_quant):
    packed, state = quantized(double_quant, shape=(9, 70))  # 630 values: 10 blocks, the last one partial
    weight = (packed, *state_args(state))
    x = torch.randn(3, 70, requires_grad=True)
    g = torch.randn(2, 9, requires_grad=True)
    torch.library.opcheck(nf4_matmul_op, (x, *weight, backend))
    torch.library.opcheck(nf4_matmul_grad_input_op, (g, *weight, backend))
    torch.library.opcheck(nf4_dequant_op, (*weight, torch.float32, backend))


def small_model(backend="auto"):
    torch.manual_seed(0)
    q = Linear4bit.from_float(nn.Linear(24, 20), NF4Config(blocksize=64))  # 480 weights: 7.5 blocks
    q.backend = backend
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), q)  # trainable Linear, then the frozen NF4 one


def outputs_and_grads(model, run, x):
    """y, and the gradients of x and of the trainable Linear, from `run` (model or its compiled form)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = run(x)
    (y * torch.arange(y.shape[-1])).sum().backward()
    return [y.detach(), x.grad, model[0].weight.grad, model[0].bias.grad]


def assert_compiles_as_one_graph_like_eager(model, compiler, tol):
    x = torch.randn(5, 12)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    expected = outputs_and_grads(model, model, x)
    got = outputs_and_grads(model, torch.compile(model, fullgraph=True, backend=compiler), x)
    assert got[2] is not None  # the gradient reached the trainable Linear upstream
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear4bit_compiles_as_one_graph_with_the_eager_backend(backend):
    assert_compiles_as_one_graph_like_eager(small_model(backend), "eager", 1e-6)


def test_linear4bit_compiles_as_one_graph_with_inductor():
    assert_compiles_as_one_graph_like_eager(small_model(), "inductor", 1e-5)


def test_the_compiled_graphs_call_the_ops_forward_and_backward():
    """The forward graph holds minilora::nf4_matmul, the backward graph minilora::nf4_matmul_grad_input:
    W is dequantized inside the ops, never a tensor of the graphs."""
    calls = {}

    def recorder(name):
        def compiler(gm, example_inputs):
            calls[name] = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
            return make_boxed_func(gm)
        return compiler

    model = small_model("torch")
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=recorder("forward"),
                                                                         bw_compiler=recorder("backward")))
    compiled(torch.randn(5, 12)).sum().backward()
    assert "minilora.nf4_matmul.default" in calls["forward"]
    assert "minilora.nf4_matmul_grad_input.default" in calls["backward"]
    assert "minilora.nf4_dequant.default" not in calls["forward"] | calls["backward"]


def test_nf4_dequant_compiles_without_a_graph_break():
    packed, state = quantized()
    f = lambda packed: nf4_dequantize(packed, state, torch.bfloat16)  # noqa: E731
    explained = torch._dynamo.explain(f)(packed)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(packed), nf4_dequantize_reference(packed, state, torch.bfloat16))


def test_nf4_config_is_immutable_so_shared_defaults_are_safe():
    config = NF4Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.blocksize = 128
    variant = dataclasses.replace(config, blocksize=128, compute_dtype=torch.bfloat16)
    assert (config.blocksize, variant.blocksize, variant.compute_dtype) == (64, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="power of two"):
        dataclasses.replace(config, blocksize=100)  # replace re-runs the checks
    for f in (Linear4bit.__init__, Linear4bit.from_float, quantize_model):
        default = inspect.signature(f).parameters["config"].default
        assert default == NF4Config() and isinstance(default, NF4Config)
