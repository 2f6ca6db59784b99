"""Trainable tokens (PEFT's `trainable_token_indices`, trainable_tokens.py) against PEFT: names,
state dicts, outputs and gradients, files both ways, merges, on an untied (LLaMA) and a tied (GPT-2)
head; and the inputs it refuses."""

import copy
import warnings

import peft
import pytest
import torch

import minilora
from conftest import batch, make

CASES = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
TOKENS = [1, 5, 7]


def both(family, tokens=TOKENS):
    base = make(family)
    kwargs = dict(r=2, target_modules=CASES[family], trainable_token_indices=tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **copy.deepcopy(kwargs)))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return base, theirs, ours


def inputs(family):
    x = batch(family)
    x["input_ids"][0, :3] = torch.tensor(TOKENS)  # the trained tokens appear
    return x


def out(model, x):
    return model(**x).logits


@pytest.mark.parametrize("family", list(CASES))
def test_same_names_outputs_and_gradients_as_peft(family):
    base, theirs, ours = both(family)
    shapes = lambda m: {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    x = inputs(family)
    assert (out(theirs.eval(), x) - out(base, x)).abs().max() > 1e-2
    torch.testing.assert_close(out(ours.eval(), x), out(theirs, x), atol=1e-5, rtol=1e-5)
    for model in (ours, theirs):
        model.train()
        model(**x).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if "trainable_tokens_delta" in n}
    mine = {n: p.grad for n, p in ours.named_parameters() if "trainable_tokens_delta" in n}
    assert grads.keys() == mine.keys() and grads
    for name in grads:
        assert mine[name].abs().max() > 0
        torch.testing.assert_close(mine[name], grads[name], atol=1e-5, rtol=1e-4)


def test_a_fresh_adapter_changes_nothing():
    base = make("gpt2")
    model = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(target_modules=["c_attn"],
                                                                            trainable_token_indices=TOKENS))
    x = inputs("gpt2")
    # the lookup swaps in identical rows; the tied head recomputes 3 logits in another matmul: same to rounding
    assert torch.equal(model.get_input_embeddings()(x["input_ids"]), base.get_input_embeddings()(x["input_ids"]))
    torch.testing.assert_close(out(model.eval(), x), out(base, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", list(CASES))
def test_files_load_both_ways(family, tmp_path):
    base, theirs, ours = both(family)
    x = inputs(family)
    expected = out(theirs.eval(), x)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(out(back.eval(), x), expected, atol=1e-5, rtol=1e-5)
    again = minilora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(out(again, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(CASES))
def test_merge_unmerge_and_unload(family):
    base, theirs, ours = both(family)
    x = inputs(family)
    expected = out(ours.eval(), x)
    table = ours.get_input_embeddings().weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(out(ours, x), expected, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    assert torch.equal(ours.get_input_embeddings().weight, table)
    merged = ours.merge_and_unload()
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    torch.testing.assert_close(merged(**x).logits, theirs.merge_and_unload()(**x).logits, atol=1e-5, rtol=1e-5)


def test_a_dict_names_the_embedding():
    base, theirs, ours = both("llama", tokens={"embed_tokens": TOKENS})
    x = inputs("llama")
    torch.testing.assert_close(out(ours.eval(), x), out(theirs.eval(), x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(trainable_token_indices=[1, 1000]), "distinct token ids"),
    (dict(trainable_token_indices={"q_proj": [1]}), "not a plain nn.Embedding"),
    (dict(trainable_token_indices=[1], modules_to_save=["embed_tokens"]), "not a plain nn.Embedding"),
    (dict(trainable_token_indices={"nothing_here": [1]}), "matches no module"),
])
def test_bad_token_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        minilora.get_peft_model(make("llama"), minilora.LoraConfig(target_modules=["v_proj"], **kwargs))
    with pytest.raises(TypeError, match="trainable_token_indices"):
        minilora.LoraConfig(trainable_token_indices="1,2")


def test_delete_the_base_state_dict_and_a_second_adapter():
    base, _, ours = both("gpt2")
    assert set(minilora.get_base_model_state_dict(ours)) == set(base.state_dict())  # the wrappers' keys taken out
    ours.add_adapter("other", minilora.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[2]))
    layer = ours.get_input_embeddings()
    assert layer.token_indices == {"default": TOKENS, "other": [2]} and set(layer.trainable_tokens_delta) == {"default", "other"}
    ours.delete_adapter("other")
    assert list(layer.trainable_tokens_delta) == ["default"] and ours.model.lm_head.adapter_names == ["default"]
