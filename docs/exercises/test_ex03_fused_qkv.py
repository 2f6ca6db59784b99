"""Exercise 3: LoRA on the Q and V slices of GPT-2's c_attn, against minilora's layer and saved adapter."""

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model

D, R, ALPHA = 32, 4, 8.0


def qv_model():
    """A tiny GPT-2 with LoRA on Q and V; init_lora_weights=False draws a non-zero B so the adapters act."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q", "v"],
                                            init_lora_weights=False)).eval()


def pairs(c_attn):
    """(A_q, B_q, A_v, B_v) of minilora's c_attn: A (r, d), B (d, r)."""
    A, B = c_attn.lora_A["default"], c_attn.lora_B["default"]
    return A["q"].weight, B["q"].weight, A["v"].weight, B["v"].weight


def test_k_is_untouched_bit_for_bit(ex):
    """K's columns equal the base layer's exactly; Q's and V's moved."""
    c_attn = qv_model().model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y0 = ex.qv_lora_forward(c_attn.base_layer, x, *pairs(c_attn), c_attn.scaling["default"]["q"]), \
            c_attn.base_layer(x)
    assert y.shape == (2, 5, 3 * D)
    assert torch.equal(y[..., D:2 * D], y0[..., D:2 * D])
    assert not torch.allclose(y[..., :D], y0[..., :D]) and not torch.allclose(y[..., 2 * D:], y0[..., 2 * D:])


def test_the_output_is_minilora_s(ex):
    """All 3d columns equal minilora's c_attn's output (fp32; the two add the update in a different
    order of operations: equal to ~1e-6)."""
    model = qv_model()
    for block in model.model.transformer.h:
        c_attn = block.attn.c_attn
        assert c_attn.scaling["default"] == {"q": ALPHA / R, "v": ALPHA / R}
        x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ours = ex.qv_lora_forward(c_attn.base_layer, x, *pairs(c_attn), ALPHA / R)
            torch.testing.assert_close(ours, c_attn(x), atol=1e-6, rtol=1e-5)


def test_gradients_reach_the_pairs_and_not_k(ex):
    """A loss on K's columns alone gives no gradient to any A or B; a loss on Q's gives B_q one."""
    c_attn = qv_model().model.transformer.h[0].attn.c_attn
    A_q, B_q, A_v, B_v = (t.detach().clone().requires_grad_() for t in pairs(c_attn))
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    y = ex.qv_lora_forward(c_attn.base_layer, x, A_q, B_q, A_v, B_v, 2.0)
    y[..., D:2 * D].sum().backward(retain_graph=True)
    assert all(t.grad is None or torch.count_nonzero(t.grad) == 0 for t in (A_q, B_q, A_v, B_v))
    y[..., :D].sum().backward()
    assert torch.count_nonzero(B_q.grad) > 0 and (B_v.grad is None or torch.count_nonzero(B_v.grad) == 0)


def test_one_lora_is_what_minilora_saves_for_peft(ex):
    """as_one_lora gives, bit for bit, the lora_A / lora_B tensors and the r / lora_alpha that
    save_pretrained writes for PEFT, and that one LoRA computes the same change as the two slices."""
    model = qv_model()
    c_attn = model.model.transformer.h[0].attn.c_attn
    A, B, r, alpha = ex.as_one_lora(*(t.detach() for t in pairs(c_attn)), R, ALPHA)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tensors = load_file(Path(folder) / "adapter_model.safetensors")
        saved = json.loads((Path(folder) / "adapter_config.json").read_text())
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    assert torch.equal(A, tensors[f"{prefix}.lora_A.weight"]) and torch.equal(B, tensors[f"{prefix}.lora_B.weight"])
    assert (r, alpha) == (saved["r"], saved["lora_alpha"]) == (2 * R, 2 * ALPHA)
    assert torch.count_nonzero(B[D:2 * D]) == 0
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(c_attn(x) - c_attn.base_layer(x), (alpha / r) * (x @ A.T) @ B.T,
                                   atol=1e-6, rtol=1e-5)
