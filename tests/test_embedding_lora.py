"""LoRA on nn.Embedding (LoraEmbedding): PEFT's math, file layout and adapter switching; PEFT is the oracle."""

import warnings

import peft
import pytest
import torch
import torch.nn as nn
from conftest import batch, make
from safetensors.torch import load_file

import minilora as ml
from minilora.embedding import LoraEmbedding

EMBEDDINGS = {"gpt2": ("wte", "transformer.wte"), "llama": ("embed_tokens", "model.embed_tokens")}


def minilora_model(family, init=True, r=4, seed=0):
    model = make(family, seed=seed)
    target, _ = EMBEDDINGS[family]
    return ml.get_peft_model(model, ml.LoraConfig(r=r, lora_alpha=8, target_modules=[target], init_lora_weights=init))


def layer_of(model, family) -> LoraEmbedding:
    return model.model.get_submodule(EMBEDDINGS[family][1])


def test_fresh_adapter_is_bit_identical_to_the_base():
    base_logits = make("gpt2")(**batch("gpt2")).logits
    model = minilora_model("gpt2")
    layer = layer_of(model, "gpt2")
    assert isinstance(layer, LoraEmbedding)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0  # A = 0, as PEFT
    assert torch.count_nonzero(layer.lora_embedding_B["default"]) > 0  # B ~ N(0, 1), as PEFT
    assert torch.equal(model(**batch("gpt2")).logits, base_logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_same_logits_and_gradients_as_peft_both_ways(family, tmp_path):
    target, path = EMBEDDINGS[family]
    theirs = peft.get_peft_model(make(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target],
                                                               init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    factors = {f"base_model.model.{path}.lora_embedding_A", f"base_model.model.{path}.lora_embedding_B"}
    assert factors <= keys <= factors | {f"base_model.model.{path}.base_layer.weight"}  # PEFT saves embed_tokens whole

    ours = ml.LoraModel.from_pretrained(make(family), tmp_path / "peft", is_trainable=True)
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == factors
    again = peft.PeftModel.from_pretrained(make(family), tmp_path / "ours", is_trainable=True)

    inputs = batch(family)
    base = make(family)(**inputs).logits
    logits = {name: m(**inputs).logits for name, m in (("peft", theirs), ("ours", ours), ("again", again))}
    assert (logits["peft"] - base).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(logits["ours"], logits["peft"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["again"], logits["peft"], atol=1e-5, rtol=0)

    grads = {}
    for name, model in (("peft", theirs), ("ours", ours)):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        layer = model.base_model.model.get_submodule(path)
        grads[name] = (layer.lora_embedding_A["default"].grad, layer.lora_embedding_B["default"].grad)
    for mine, reference in zip(grads["ours"], grads["peft"]):
        assert mine is not None and mine.abs().max() > 0
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)


def test_merge_gives_the_unmerged_output_and_unmerge_restores_W_bit_for_bit():
    model = minilora_model("llama", init=False)  # LLaMA's head is not tied to embed_tokens
    layer = layer_of(model, "llama")
    W0 = layer.base_layer.weight.clone()
    inputs = batch("llama")
    unmerged = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untied head: no warning
        model.merge_adapter()
    expected = W0 + (8 / 4) * (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T
    torch.testing.assert_close(layer.base_layer.weight, expected)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, W0)
    merged = model.merge_and_unload()
    assert isinstance(merged.model.embed_tokens, nn.Embedding)
    torch.testing.assert_close(merged(**inputs).logits, unmerged, atol=1e-5, rtol=0)


def test_disable_set_and_delete_adapter_work_through_the_model():
    model = minilora_model("gpt2", init=False)
    inputs = batch("gpt2")
    base = make("gpt2")(**inputs).logits
    adapted = model(**inputs).logits
    assert (adapted - base).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, base)
        assert not layer_of(model, "gpt2").lora_embedding_A["default"].requires_grad
    assert torch.equal(model(**inputs).logits, adapted)

    model.add_adapter("other", ml.LoraConfig(r=2, lora_alpha=4, target_modules=["wte"], init_lora_weights=False))
    model.set_adapter("other")
    layer = layer_of(model, "gpt2")
    assert layer.lora_embedding_A["other"].requires_grad and not layer.lora_embedding_A["default"].requires_grad
    other = model(**inputs).logits
    assert (other - adapted).abs().max() > 1e-3

    model.eval()
    rows = model(**inputs, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(rows[0], adapted[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1], base[1], atol=1e-5, rtol=0)

    model.delete_adapter("other")
    assert "other" not in layer.lora_embedding_A and model.active_adapters == ["default"]
    assert torch.equal(model(**inputs).logits, adapted)


def test_tied_head_reads_the_base_weight_until_merged():
    model = minilora_model("gpt2", init=False)
    hf = model.model
    layer = layer_of(model, "gpt2")
    assert hf.lm_head.weight is layer.base_layer.weight  # still tied: the adapter did not untie it
    W0 = layer.base_layer.weight.clone()
    inputs = batch("gpt2")
    unmerged = model(**inputs).logits
    hidden = hf.transformer(**inputs).last_hidden_state
    torch.testing.assert_close(unmerged, hidden @ W0.T)  # the head reads the base E

    with pytest.warns(UserWarning, match="LM head shares"):
        model.merge_adapter()
    assert torch.equal(hf.lm_head.weight, layer.base_layer.weight)  # the head sees the merged E
    assert not torch.equal(hf.lm_head.weight, W0)
    assert (model(**inputs).logits - unmerged).abs().max() > 1e-3  # so the logits change
    model.unmerge_adapter()
    assert torch.equal(hf.lm_head.weight, W0)
    assert torch.equal(model(**inputs).logits, unmerged)


def test_all_linear_and_role_names_do_not_pick_embeddings():
    for family in ("gpt2", "llama"):
        model = ml.get_peft_model(make(family), ml.LoraConfig(r=2, target_modules="all-linear"))
        assert not any(isinstance(m, LoraEmbedding) for m in model.modules())
        assert model.targeted_module_names  # linear layers were picked
    model = ml.get_peft_model(make("llama"), ml.LoraConfig(r=2, target_modules=["q", "embed_tokens"]))
    assert isinstance(model.model.model.embed_tokens, LoraEmbedding)


@pytest.mark.parametrize("r", [33, 129])
def test_rank_above_the_embedding_dimension_is_refused(r):
    with pytest.raises(ValueError, match="transformer.wte: .*r must be between 1 and 32"):
        minilora_model("gpt2", r=r)


def test_rank_above_the_number_of_embeddings_is_refused():
    from minilora.lora import AdapterState, LoraPart
    from minilora.roles import FULL

    layer = LoraEmbedding(nn.Embedding(8, 32), AdapterState())
    layer.add_adapter("ok", {FULL: LoraPart(0, 32, 8, 16.0)})
    with pytest.raises(ValueError, match="8 rows × 32 dims: r must be between 1 and 8"):
        layer.add_adapter("too_big", {FULL: LoraPart(0, 32, 9, 16.0)})


def test_base_state_dict_drops_embedding_factors():
    model = minilora_model("gpt2")
    keys = ml.model.get_base_model_state_dict(model)
    assert "transformer.wte.weight" in keys
    assert not any("lora_embedding" in k for k in keys)
