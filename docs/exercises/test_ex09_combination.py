"""Exercise 9: the cat and linear combinations, against minilora's add_weighted_adapter."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model

NAMES = ["finance", "legal", "medical"]


def three_adapters():
    """A tiny GPT-2 with three LoRA adapters on Q (non-zero B), of ranks 4, 4, 4 and alphas 8, 4, 12."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q"], init_lora_weights=False),
                             adapter_name=NAMES[0])
    for name, alpha in zip(NAMES[1:], (4, 12)):
        wrapped.add_adapter(name, LoraConfig(r=4, lora_alpha=alpha, target_modules=["q"], init_lora_weights=False))
    return wrapped


def given(layer, names):
    """(A, B, scale) of each adapter's Q pair on one layer."""
    return [(layer.lora_A[n]["q"].weight.detach(), layer.lora_B[n]["q"].weight.detach(), layer.scaling[n]["q"])
            for n in names]


def test_cat_is_exact_and_minilora_s(ex):
    """cat: your factors are those add_weighted_adapter(combination_type="cat") stores (A bit for bit, a
    copy; B to an ulp, as w·s·B may be multiplied in another order), rank 12, and B·A equals
    Σ wᵢ sᵢ Bᵢ Aᵢ (fp32, ~1e-7 of entries ~0.1)."""
    model = three_adapters()
    weights = [0.7, 0.3, -0.5]
    model.add_weighted_adapter(NAMES, weights, "cat", combination_type="cat")
    for block in model.model.transformer.h:
        layer = block.attn.c_attn
        A, B = ex.cat_combination(given(layer, NAMES), weights)
        assert A.shape == (12, 32) and B.shape == (32, 12)
        assert torch.equal(A, layer.lora_A["cat"]["q"].weight)
        torch.testing.assert_close(B, layer.lora_B["cat"]["q"].weight, atol=1e-7, rtol=1e-6)
        assert layer.scaling["cat"]["q"] == 1.0
        target = sum(w * layer.delta_weight(n, "q") for n, w in zip(NAMES, weights))
        torch.testing.assert_close(B @ A, target, atol=1e-6, rtol=1e-5)


def test_cat_takes_adapters_of_different_ranks(ex):
    """Ranks 2 and 5 stack to rank 7, and B·A is still the weighted sum."""
    g = torch.Generator().manual_seed(1)
    adapters = [(torch.randn(2, 6, generator=g), torch.randn(3, 2, generator=g), 2.0),
                (torch.randn(5, 6, generator=g), torch.randn(3, 5, generator=g), 0.5)]
    A, B = ex.cat_combination(adapters, [1.0, -2.0])
    assert A.shape == (7, 6) and B.shape == (3, 7)
    torch.testing.assert_close(B @ A, 2.0 * adapters[0][1] @ adapters[0][0] - 1.0 * adapters[1][1] @ adapters[1][0])


def test_linear_is_minilora_s_and_only_an_approximation(ex):
    """linear: your factors equal those add_weighted_adapter(combination_type="linear") stores (fp32,
    the same sums: ~1 ulp), including a negative weight; its B·A differs from the weighted sum by the
    cross terms, far more than rounding."""
    model = three_adapters()
    weights = [0.7, 0.3, -0.5]
    model.add_weighted_adapter(NAMES, weights, "linear", combination_type="linear")
    for block in model.model.transformer.h:
        layer = block.attn.c_attn
        A, B = ex.linear_combination(given(layer, NAMES), weights)
        assert A.shape == (4, 32) and B.shape == (32, 4)
        torch.testing.assert_close(A, layer.lora_A["linear"]["q"].weight, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(B, layer.lora_B["linear"]["q"].weight, atol=1e-7, rtol=1e-6)
        target = sum(w * layer.delta_weight(n, "q") for n, w in zip(NAMES, weights))
        assert (B @ A - target).norm() > 0.1 * target.norm()


def test_linear_of_one_adapter_is_exact(ex):
    """With one adapter there are no cross terms: B·A = w s B₁ A₁ (w > 0)."""
    g = torch.Generator().manual_seed(2)
    A1, B1 = torch.randn(3, 8, generator=g), torch.randn(5, 3, generator=g)
    A, B = ex.linear_combination([(A1, B1, 2.0)], [0.25])
    torch.testing.assert_close(B @ A, 0.5 * B1 @ A1)
