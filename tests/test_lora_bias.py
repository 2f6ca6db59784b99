"""lora_bias (PEFT's `lora_bias=True`), a variant in a file of its own: the same parameters, outputs,
gradients, merges and files as PEFT's, both ways."""

import copy
import warnings

import peft
import pytest
import torch

import minilora
from conftest import batch, logits, make

CASES = {"gpt2": ["c_attn", "c_fc"], "llama": "all-linear", "bert": ["query", "value"]}


def both(family, **extra):
    base = make(family)
    kwargs = dict(r=4, lora_alpha=8, target_modules=CASES[family], lora_bias=True, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out note on Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return base, theirs, ours


@pytest.mark.parametrize("family", list(CASES))
def test_same_parameters_outputs_and_gradients_as_peft(family):
    base, theirs, ours = both(family)
    shapes = lambda m: {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert any(n.endswith("lora_B.default.bias") for n in shapes(ours))
    inputs = batch(family)
    assert (logits(ours.eval(), inputs) - logits(base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, inputs), logits(theirs.eval(), inputs), atol=1e-5, rtol=1e-5)
    for model in (ours, theirs):
        model.train()
        out = model(**inputs)
        out.logits.float().pow(2).mean().backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.named_parameters():
        if name.endswith("lora_B.default.bias"):
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(p.grad, their_grads[name], atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 2


def test_a_fresh_bias_is_zero_and_changes_nothing():
    base = make("gpt2")
    model = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(r=4, target_modules=["c_attn"], lora_bias=True))
    inputs = batch("gpt2")
    assert torch.equal(logits(model.eval(), inputs), logits(base, inputs))


@pytest.mark.parametrize("direction", ["peft to minilora", "minilora to peft"])
def test_files_load_both_ways(direction, tmp_path):
    base, theirs, ours = both("gpt2")
    inputs = batch("gpt2")
    expected = logits(theirs.eval(), inputs)
    source = theirs if direction == "peft to minilora" else ours
    source.save_pretrained(tmp_path)
    if direction == "peft to minilora":
        back = minilora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    else:
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert back.peft_config["default"].lora_bias is True
    torch.testing.assert_close(logits(back.eval(), inputs), expected, atol=1e-5, rtol=1e-5)


def test_slices_carry_their_bias_rows_into_peft_s_file(tmp_path):
    """q and v of GPT-2's c_attn: the file's one lora_B.bias holds each slice's rows and zero for K's."""
    base = make("gpt2")
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(r=2, target_modules=["q", "v"], lora_bias=True,
                                                                            init_lora_weights=False))
    inputs = batch("gpt2")
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(theirs.eval(), inputs), logits(ours.eval(), inputs), atol=1e-5, rtol=1e-5)
    again = minilora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(again, inputs), logits(ours, inputs), atol=1e-6, rtol=0)


def test_merge_folds_the_bias_into_the_base_and_unmerge_takes_it_out():
    base, theirs, ours = both("gpt2")  # GPT-2's Conv1D layers have biases
    inputs = batch("gpt2")
    expected = logits(ours.eval(), inputs)
    before = {n: p.clone() for n, p in ours.named_parameters() if n.endswith("base_layer.bias")}
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    merged_peft = theirs.merge_and_unload()
    torch.testing.assert_close(logits(merged_peft.eval(), inputs), expected, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    for name, p in ours.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)


def test_a_base_without_bias_trains_it_but_refuses_to_merge_and_changes_nothing():
    model = minilora.get_peft_model(make("llama"), minilora.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True,
                                                                       init_lora_weights=False))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="cannot be merged"):
        model.merge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_kinds_and_calls_that_cannot_carry_it_refuse_it():
    with pytest.raises(ValueError, match="lora_bias"):
        minilora.get_peft_model(make("llama"), minilora.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias with DoRA"):
        minilora.get_peft_model(make("llama"), minilora.LoraConfig(target_modules=["q_proj"], lora_bias=True, use_dora=True))
    model = minilora.get_peft_model(make("gpt2"), minilora.LoraConfig(target_modules=["c_attn"], lora_bias=True)).eval()
    inputs = batch("gpt2")
    with pytest.raises(TypeError, match="lora_bias"):
        minilora.LoraConfig(lora_bias="yes")
