"""Tier 2, oracle: minilora against PEFT on the same tiny models (PEFT is a test-only dependency)."""

import copy

import peft
import pytest
import torch

import minilora
from conftest import batch, logits, make
from minilora.lora import LoraLinear

CASES = {  # family -> (target_modules, task_type, extra config)
    "gpt2": (["c_attn"], "CAUSAL_LM", {"layers_to_transform": [2, 3]}),
    "llama": (["q_proj", "v_proj", "down_proj"], "CAUSAL_LM", {}),
    "bert": (["query", "value"], "SEQ_CLS", {}),
    "t5": (["q", "v"], "SEQ_2_SEQ_LM", {}),
    "bart": (["q_proj", "v_proj", "fc1"], "SEQ_2_SEQ_LM", {"rank_pattern": {"fc1": 2}}),
}


def both(family, **overrides):
    """The same base model wrapped by PEFT and by minilora, with PEFT's random A and B copied over."""
    targets, task, extra = CASES[family]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type=task, **extra)
    kwargs.update(overrides)
    base = make(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs))
    copy_peft_weights(theirs, ours)
    return base, theirs.eval(), ours.eval()


def copy_peft_weights(theirs, ours):
    """Every lora_A / lora_B of PEFT's model into minilora's, by name."""
    their_params = dict(theirs.named_parameters())
    copied = 0
    for path, module in ours.model.named_modules():
        if isinstance(module, LoraLinear):
            for side in ("lora_A", "lora_B"):
                src = their_params[f"base_model.model.{path}.{side}.default.weight"]
                getattr(module, side)["default"].weight.data.copy_(src)
                copied += 1
    assert copied > 0


@pytest.mark.parametrize("family", list(CASES))
def test_same_parameters_as_peft(family):
    """Every parameter, frozen or trained: PEFT's name, shape and requires_grad (no translation)."""
    _, theirs, ours = both(family)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    shapes = lambda m: {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("family", list(CASES))
def test_same_outputs_as_peft(family):
    base, theirs, ours = both(family)
    inputs = batch(family)
    expected = logits(theirs, inputs)
    assert not torch.allclose(expected, logits(base, inputs), atol=1e-4)  # the adapter does act
    torch.testing.assert_close(logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)


def test_printed_line_matches_peft(capsys):
    _, theirs, ours = both("gpt2")
    theirs.print_trainable_parameters()
    ours.print_trainable_parameters()
    their_line, our_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == their_line


def test_merged_weights_match_peft():
    _, theirs, ours = both("gpt2")
    merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(merged_theirs.named_parameters(), merged_ours.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


def test_seed_examples_run_with_only_the_import_changed(capsys):
    from minilora import LoraConfig, get_peft_model  # the one line a PEFT user changes

    model = make("gpt2", n_layer=12)
    lora_config = LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn"], lora_dropout=0.05,
                             bias="none", task_type="CAUSAL_LM", layers_to_transform=[9, 10, 11])
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 6,144 || all params:")  # 3 layers × 16 × (32 + 96)

    model = get_peft_model(make("t5"), LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"],
                                                  lora_dropout=0.05, bias="none", task_type="SEQ_2_SEQ_LM"))
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], lora_dropout=0.05,
                             bias="none", task_type="SEQ_2_SEQ_LM")
    model.add_adapter("finance", lora_config)
    model.add_adapter("medical", lora_config)
    model.set_adapter("medical")
    assert model.active_adapters == ["medical"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".medical." in n for n in trainable)
