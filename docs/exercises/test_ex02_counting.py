"""Exercise 2: parameter counts by hand, against get_nb_trainable_parameters() and parameter_breakdown()."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model

CONFIGS = [GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0),
           GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=70, n_positions=24, n_inner=80, bos_token_id=0,
                      eos_token_id=0)]
PLANS = [(4, ["q", "v"], None), (8, ["q", "k", "v"], None), (2, ["v"], [1]), (4, ["q", "v", "c_fc"], [0, 1])]


def wrapped(config, r, targets, layers):
    torch.manual_seed(0)
    return get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=r, target_modules=targets, layers_to_transform=layers))


def test_one_pair(ex):
    """r (d_in + d_out): the article's 768 x 768 at r = 8 is 12,288 numbers, 2.08 % of ΔW."""
    assert ex.lora_parameters(768, 768, 8) == 12_288
    assert ex.lora_parameters(32, 128, 4) == 640
    assert ex.lora_parameters(10, 3, 1) == 13


def test_a_plan_s_trainable_parameters_are_minilora_s(ex):
    """Each plan's count equals minilora's get_nb_trainable_parameters()[0], exactly."""
    for config in CONFIGS:
        for r, targets, layers in PLANS:
            trainable, _ = wrapped(config, r, targets, layers).get_nb_trainable_parameters()
            assert ex.plan_parameters(config, r, targets, layers) == trainable, (config.n_embd, r, targets, layers)


def test_the_base_s_breakdown_is_minilora_s(ex):
    """Each component's count equals parameter_breakdown()'s row, and LoRA's row is the plan's count."""
    for config in CONFIGS:
        rows = wrapped(config, 4, ["q", "v"], None).parameter_breakdown()
        by_hand = ex.gpt2_base_parameters(config)
        assert set(by_hand) == {"embeddings", "attention", "ffn", "norm"}
        for name, count in by_hand.items():
            assert rows[name]["params"] == count, name
        assert rows["head"]["params"] == 0  # tied to wte
        assert rows["lora"]["params"] == ex.plan_parameters(config, 4, ["q", "v"])
        assert rows["total"]["params"] == sum(by_hand.values()) + rows["lora"]["params"]


def test_gpt2_small_by_hand(ex):
    """GPT-2 small's own numbers (no model built): 124,439,808 weights, and Q+V at r = 8 on every
    layer 294,912 trainable, 0.24 % (the numbers PEFT prints for GPT-2 with this plan)."""
    base = ex.gpt2_base_parameters(GPT2Config())
    assert sum(base.values()) == 124_439_808
    assert base["attention"] == 28_348_416 and base["ffn"] == 56_669_184
    assert ex.plan_parameters(GPT2Config(), 8, ["q", "v"]) == 294_912
