"""PEFT's behaviour as the specification, case by case: each test runs the same steps on a PEFT
model and on a minilora model (PEFT is the oracle), so a failure says which side moved.

Ported from the behaviour PEFT's own LoRA tests check (test_custom_models.py, test_tuners_utils.py,
test_initialization.py): trainable parameters, disabling, merging, adapter management, files,
error types and warnings, and where minilora used to be stricter than PEFT.
"""

import json
import warnings

import peft
import pytest
import torch
from conftest import make
from transformers import LlamaConfig, LlamaForSequenceClassification

import minilora

IDS = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
LIBRARIES = ("peft", "minilora")


def wrap(library, base, **config):
    lib = peft if library == "peft" else minilora
    return lib.get_peft_model(base, lib.LoraConfig(**config))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def llama_classifier():
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


# ---------------------------------------------------------------- bugs PEFT does not have
def test_seq_cls_all_linear_trains_the_head_once():
    counts = {lib: trainable(wrap(lib, llama_classifier(), r=4, target_modules="all-linear", task_type="SEQ_CLS"))
              for lib in LIBRARIES}
    assert counts["minilora"] == counts["peft"]  # the score head: a trainable copy, never also LoRA


@pytest.mark.parametrize("library", LIBRARIES)
def test_disable_adapter_freezes_the_adapter_for_its_duration(library):
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj", "v_proj"])
    assert all(p.requires_grad for p in lora_parameters(model))
    with model.disable_adapter():
        assert not any(p.requires_grad for p in lora_parameters(model))
    assert all(p.requires_grad for p in lora_parameters(model))


@pytest.mark.parametrize("library", LIBRARIES)
def test_disable_after_merge_gives_the_base_and_leaves_the_adapter_unmerged(library):
    torch.manual_seed(1)
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False).eval()
    adapted = logits(model)
    with model.disable_adapter():
        base = logits(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the API PEFT code calls
@pytest.mark.parametrize("library", LIBRARIES)
def test_safe_merge_and_its_refusal_of_a_broken_adapter(library):
    torch.manual_seed(2)
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj"], init_lora_weights=False).eval()
    adapted = logits(model)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with torch.no_grad():
        lora_parameters(model)[-1].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(model.get_base_model()), logits(model.get_base_model()))  # still usable
    merged = wrap(library, make("llama"), r=4, target_modules=["q_proj"]).merge_and_unload(safe_merge=True)
    assert not any("lora" in n for n, _ in merged.named_modules())


@pytest.mark.parametrize("library", LIBRARIES)
def test_add_adapter_by_keywords_set_adapter_lists_and_targeted_names(library):
    lib = peft if library == "peft" else minilora
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj"])
    model.add_adapter(adapter_name="other", peft_config=lib.LoraConfig(r=2, target_modules=["q_proj"]))
    tuner = model.base_model  # PEFT's set_adapter with a list lives on the tuner; minilora's model is both
    tuner.set_adapter(["default", "other"])
    assert tuner.active_adapters == ["default", "other"] and tuner.active_adapter == ["default", "other"]
    assert sorted(tuner.targeted_module_names) == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    tuner.set_adapter("other")
    assert tuner.active_adapter == "other"


@pytest.mark.parametrize("library", LIBRARIES)
def test_disable_and_enable_adapter_layers(library):
    torch.manual_seed(3)
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj"], init_lora_weights=False).eval()
    adapted = logits(model)
    with model.disable_adapter():
        base = logits(model)
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(logits(model), base)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(logits(model), adapted)


@pytest.mark.parametrize("writer", LIBRARIES)
@pytest.mark.parametrize("reader", LIBRARIES)
def test_bin_files_model_card_and_load_results(tmp_path, writer, reader):
    torch.manual_seed(4)
    saved = wrap(writer, make("llama"), r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False).eval()
    saved.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)  # tensors only: loads safely
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    if reader == "peft":
        loaded = peft.PeftModel.from_pretrained(make("llama"), tmp_path).eval()
    else:
        loaded = minilora.LoraModel.from_pretrained(make("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(saved), atol=1e-6, rtol=1e-6)
    result = loaded.load_adapter(tmp_path, adapter_name="again")
    assert result.unexpected_keys == []


@pytest.mark.parametrize("library", LIBRARIES)
def test_from_pretrained_with_a_config_uses_that_config(tmp_path, library):
    lib = peft if library == "peft" else minilora
    wrap(library, make("llama"), r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = lib.LoraConfig(r=4, target_modules=["q_proj"], lora_alpha=32)
    cls = peft.PeftModel if library == "peft" else minilora.LoraModel
    model = cls.from_pretrained(make("llama"), tmp_path, config=config)
    assert model.peft_config["default"].lora_alpha == 32


def test_peft_loads_minilora_files_without_a_warning(tmp_path):
    wrap("minilora", make("gpt2"), r=4, target_modules=["q", "v"]).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(make("gpt2"), tmp_path)
    assert not [w for w in caught if "minilora" in str(w.message) or "Unexpected keyword" in str(w.message)]
    assert "minilora" not in json.loads((tmp_path / "adapter_config.json").read_text())


# ---------------------------------------------------------------- error types and warnings
@pytest.mark.parametrize("library", LIBRARIES)
def test_mixed_batch_errors_are_value_errors(library):
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj"])
    model.train()
    if library == "peft":  # PEFT's mixed batches are inference-only; minilora's train (test_mixed_training.py)
        with pytest.raises(ValueError):
            model(input_ids=IDS, adapter_names=["default", "default"])
    else:
        model(input_ids=IDS, adapter_names=["default", "default"]).logits.sum().backward()
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError):
        model(input_ids=IDS, adapter_names=["default", "default"])


@pytest.mark.parametrize("library", LIBRARIES)
def test_merging_twice_and_unused_exclusions_warn(library):
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj"])
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    with pytest.warns(UserWarning, match="exclude_modules"):
        wrap(library, make("llama"), r=4, target_modules=["q_proj"], exclude_modules=["nowhere"])


# ---------------------------------------------------------------- no stricter than PEFT
@pytest.mark.parametrize("library", LIBRARIES)
def test_what_peft_accepts(library):
    lib = peft if library == "peft" else minilora
    wrap(library, make("llama"), r=40, target_modules=["q_proj"])  # r above min(d_in, d_out) = 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = wrap(library, make("llama"), r=4, target_modules=["q_proj", "no_such_module"])
        assert sorted(partial.base_model.targeted_module_names)[0] == "model.layers.0.self_attn.q_proj"
        beyond = wrap(library, make("llama"), r=4, target_modules=["q_proj"], layers_to_transform=[0, 9])
        assert sorted(beyond.base_model.targeted_module_names) == ["model.layers.0.self_attn.q_proj"]
        base = make("llama")
        wrap(library, base, r=4, target_modules=["q_proj"])
        wrap(library, base, r=2, target_modules=["v_proj"])  # a second get_peft_model on the same base
    with pytest.raises(ValueError):
        wrap(library, make("llama"), r=4, target_modules=["nothing", "at_all"])  # nothing at all: an error
    model = wrap(library, make("llama"), r=4, target_modules=["q_proj"], bias="all")
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        model.add_adapter("other", lib.LoraConfig(r=4, target_modules=["q_proj"], bias="all"))


def test_linear_combination_with_negative_weights_matches_peft(tmp_path):
    torch.manual_seed(5)
    theirs = wrap("peft", make("llama"), r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)  # the same two adapters for both libraries
    ours = minilora.LoraModel.from_pretrained(make("llama"), tmp_path)
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "b"], [1.0, -0.5], "negated", combination_type="linear")
        model.set_adapter("negated")
    torch.testing.assert_close(logits(ours.eval()), logits(theirs.eval()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_target_modules_from_the_defaults_are_filled_in_as_peft_does(family, tmp_path):
    import peft

    ours = minilora.get_peft_model(make(family), minilora.LoraConfig(r=2))
    theirs = peft.get_peft_model(make(family), peft.LoraConfig(r=2))
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules
    assert isinstance(ours.peft_config["default"].target_modules, set)
    ours.save_pretrained(tmp_path)  # and the saved config lists them
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(theirs.peft_config["default"].target_modules)


@pytest.mark.parametrize("family, targets", [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj", "embed_tokens"])])
def test_layers_carry_peft_s_per_adapter_attributes(family, targets):
    import peft

    config = dict(r=4, lora_alpha=16, target_modules=targets, rank_pattern={targets[0]: 2}, use_dora=False)
    ours = minilora.get_peft_model(make(family), minilora.LoraConfig(**config))
    theirs = peft.get_peft_model(make(family), peft.LoraConfig(**config))
    mine = {n: m for n, m in ours.named_modules() if hasattr(m, "lora_alpha") and hasattr(m, "base_layer")}
    peers = {n: m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert mine.keys() == peers.keys() and mine
    for name, layer in mine.items():
        peer = peers[name]
        assert (layer.r, layer.lora_alpha) == (peer.r, peer.lora_alpha), name
        assert layer.base_layer is not None and layer.merged_adapters == peer.merged_adapters == []
    sliced = minilora.get_peft_model(make("gpt2"), minilora.LoraConfig(r=4, target_modules=["q", "v"]))
    layer = sliced.base_model.model.transformer.h[0].attn.c_attn
    assert layer.r == {"default": {"q": 4, "v": 4}}  # parts, which PEFT cannot express, one level below
