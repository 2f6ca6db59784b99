"""Exercise 0: a LoRA layer in plain PyTorch, against minilora's own layer."""

import copy
import math

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from minilora import LoraConfig, get_peft_model


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_a_fresh_layer_is_the_base_bit_for_bit(ex):
    """B = 0: the output equals the base layer's exactly; the base is frozen, A and B train; scale α/r."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    layer = ex.LoRALinear(base, r=4, alpha=8)
    assert layer.base is base and layer.scaling == 2.0
    assert tuple(layer.A.shape) == (4, 24) and tuple(layer.B.shape) == (16, 4)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) == layer.A.numel()
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.A.requires_grad and layer.B.requires_grad
    x = torch.randn(3, 5, 24)  # any leading shape
    assert torch.equal(layer(x), base(x))


def test_A_is_drawn_like_peft(ex):
    """kaiming_uniform(a=√5): uniform on ±1/√d_in, so the largest |A| is near the bound and the
    standard deviation near bound/√3 (4096 draws: the std is within a few percent)."""
    torch.manual_seed(1)
    d_in = 256
    A = ex.LoRALinear(nn.Linear(d_in, 8), r=16, alpha=16).A.detach()
    bound = 1 / math.sqrt(d_in)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(A.mean().item()) < 0.05 * bound


def test_the_update_is_alpha_over_r_B_A(ex):
    """With a non-zero B the output is the base plus (α/r)(x Aᵀ)Bᵀ (fp32, a few ulps apart at most)."""
    torch.manual_seed(2)
    base = nn.Linear(24, 16)
    layer = ex.LoRALinear(base, r=4, alpha=12)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(7, 24)
    expected = base(x) + 3.0 * x @ (layer.B @ layer.A).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_a_wrapped_model_computes_what_minilora_computes(ex):
    """wrap_attention on Llama's q_proj and v_proj, and get_peft_model with the same targets: copying
    each A and B into minilora's lora_A / lora_B gives the same logits and the same gradients of A and
    B (fp32; the two add the update in a different order of operations, so they agree to ~1e-6, not
    bit for bit)."""
    base = tiny_llama()
    ours, theirs_base = copy.deepcopy(base), copy.deepcopy(base)
    names = ex.wrap_attention(ours, r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    theirs = get_peft_model(theirs_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(ids).logits, base(ids).logits, atol=0, rtol=0)  # B = 0: the base, exactly
    torch.manual_seed(4)
    for name in names:
        mine, minilora_layer = ours.get_submodule(name), theirs.model.get_submodule(name)
        assert isinstance(mine, ex.LoRALinear)
        with torch.no_grad():
            mine.B.normal_(std=0.1)
            minilora_layer.lora_A["default"].weight.copy_(mine.A)
            minilora_layer.lora_B["default"].weight.copy_(mine.B)
        assert minilora_layer.scaling["default"] == mine.scaling
    mine_out, their_out = ours(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(mine_out.logits, their_out.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mine_out.logits, base(ids).logits, atol=1e-3)  # the adapters act
    mine_out.loss.backward()
    their_out.loss.backward()
    for name in names:
        mine, minilora_layer = ours.get_submodule(name), theirs.model.get_submodule(name)
        torch.testing.assert_close(mine.A.grad, minilora_layer.lora_A["default"].weight.grad, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(mine.B.grad, minilora_layer.lora_B["default"].weight.grad, atol=1e-7, rtol=1e-4)


def test_only_the_adapters_train(ex):
    """After wrapping, the trainable parameters are the A's and B's only, as many as minilora counts;
    one optimizer step changes them and leaves every base weight bit for bit."""
    model = tiny_llama()
    ex.wrap_attention(model, r=4, alpha=8)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    expected, _ = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                                 ).get_nb_trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == expected
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.count_nonzero(p) > 0 for n, p in trainable.items() if n.endswith(".B"))  # B moved off zero
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
