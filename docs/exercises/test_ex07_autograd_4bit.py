"""Exercise 7: a hand-written backward through an NF4 weight, against gradcheck, minilora's Linear4bit,
and the adapter gradients of a QLoRA layer."""

from collections import OrderedDict

import torch
import torch.nn as nn

from minilora import LoraConfig, get_peft_model, quantize_model
from minilora.quant import Linear4bit, nf4_quantize


def quantized(d_in=32, d_out=16, seed=0):
    torch.manual_seed(seed)
    return Linear4bit.from_float(nn.Linear(d_in, d_out, bias=False))


def test_gradcheck_in_float64(ex):
    """torch.autograd.gradcheck compares your backward with finite differences (float64, its default
    tolerances: atol 1e-5, rtol 1e-3); the product is linear in x, so they agree closely."""
    packed, state = nf4_quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), 64, True)
    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ex.NF4Matmul.apply(t, packed, state), (x,))


def test_output_and_input_gradient_are_linear4bit_s(ex):
    """Forward and ∂L/∂x equal minilora's Linear4bit's (both multiply by the same dequantized fp32
    weight: equal to an fp32 rounding, ≤ 1e-6)."""
    layer = quantized()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    y = ex.NF4Matmul.apply(x, layer.packed, layer.state)
    y_ref = layer(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, g @ layer.dequantized_weight(torch.float32), atol=1e-6, rtol=1e-6)


def test_no_dense_weight_is_kept_for_the_backward(ex):
    """Between forward and backward, autograd holds only what the Function saved: no floating-point
    tensor of the weight's shape (the packed uint8 codes are fine)."""
    layer = quantized(d_in=64, d_out=32)
    saved = []
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ex.NF4Matmul.apply(x, layer.packed, layer.state)
    assert y.shape == (4, 32)
    assert not [t for t in saved if t.is_floating_point() and t.shape in ((32, 64), (64, 32))]
    y.sum().backward()
    assert x.grad.shape == (4, 64)


def test_lora_gradients_are_autograd_s_on_minilora_s_qlora_layer(ex):
    """A QLoRA layer (quantize_model, then get_peft_model with a non-zero B): your ∂L/∂A and ∂L/∂B
    equal the gradients autograd leaves on lora_A / lora_B (fp32, ~1e-6)."""
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict(proj=nn.Linear(32, 16, bias=False)))
    quantize_model(model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    layer = peft.model.proj
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(6))
    g = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    peft(x).backward(g)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grad_A, grad_B = ex.lora_grads(x, g, A.detach(), B.detach(), layer.scaling["default"])
    torch.testing.assert_close(grad_A, A.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_B, B.grad, atol=1e-6, rtol=1e-5)
