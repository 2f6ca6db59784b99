"""LoraModel's API: adapters, disable, merge/unload, generate, counting."""

import re

import pytest
import torch

from conftest import batch, logits, make, train_losses
from minilora import LoraConfig, LoraModel, LoraLinear, format_breakdown, get_peft_model, presets

QV = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)


@pytest.fixture(params=["gpt2", "llama", "bert", "t5", "bart"])
def family(request):
    return request.param


def wrapped(family, config=QV):
    base = make(family)
    inputs = batch(family)
    expected = logits(base, inputs)
    return get_peft_model(base, config), inputs, expected


def test_forward_changes_and_disable_adapter_is_exactly_the_base(family):
    pm, inputs, expected = wrapped(family)
    assert not torch.allclose(logits(pm, inputs), expected)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, inputs), expected)
    assert not torch.allclose(logits(pm, inputs), expected)


def test_merge_unmerge_and_merge_and_unload(family):
    pm, inputs, expected = wrapped(family)
    adapted = logits(pm, inputs)
    pm.merge_adapter()
    pm.merge_adapter()  # twice: a no-op, not a double add
    torch.testing.assert_close(logits(pm, inputs), adapted, atol=1e-5, rtol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(logits(pm, inputs), adapted, atol=1e-5, rtol=1e-5)  # low-rank path again
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, inputs), expected, atol=1e-5, rtol=1e-5)  # W restored
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_unload_gives_back_the_original_model():
    pm, inputs, expected = wrapped("gpt2")
    pm.merge_adapter()
    base = pm.unload()
    torch.testing.assert_close(logits(base, inputs), expected, atol=1e-6, rtol=0)
    assert type(base.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_add_set_delete_adapters():
    pm, inputs, expected = wrapped("llama")
    first = logits(pm, inputs)
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q", "o"], init_lora_weights=False))
    assert pm.active_adapters == ["default"]
    torch.testing.assert_close(logits(pm, inputs), first)  # adding does not activate
    pm.set_adapter("other")
    assert pm.active_adapters == ["other"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    second = logits(pm, inputs)
    assert not torch.allclose(second, first)
    q = pm.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        q_other, q_base = q(x), q.base_layer(x)
        pm.set_adapter("default")
        q_default = q(x)
        pm.set_adapter(["default", "other"])  # both at once: their deltas add on a shared layer
        q_both = q(x)
    torch.testing.assert_close(q_both - q_base, (q_default - q_base) + (q_other - q_base), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(pm, inputs), first) and not torch.allclose(logits(pm, inputs), second)
    pm.delete_adapter("other")
    assert pm.active_adapters == ["default"] and "other" not in pm.peft_config
    assert not any(".other." in n for n, _ in pm.named_parameters())
    torch.testing.assert_close(logits(pm, inputs), first)


def test_adapter_name_errors():
    pm, _, _ = wrapped("gpt2")
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        pm.add_adapter("default", QV)
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; available adapters: \['default'\]"):
        pm.set_adapter("nope")
    pm.add_adapter("gone", QV)
    pm.delete_adapter("gone")
    with pytest.raises(ValueError, match="no adapter named 'gone'"):
        pm.set_adapter("gone")
    with pytest.raises(ValueError, match="no adapter named 'gone'"):
        pm.delete_adapter("gone")
    with pytest.raises(ValueError, match="without '.'"):
        pm.add_adapter("a.b", QV)
    with pytest.raises(TypeError, match="minilora LoraConfig"):
        get_peft_model(make("gpt2"), {"r": 8})


def test_disable_while_merged_unmerges_as_peft_does():
    pm, _, _ = wrapped("gpt2")
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        adapted = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
        pm.merge_adapter()
        with pm.disable_adapter():
            torch.testing.assert_close(pm(input_ids=ids).logits, base, atol=1e-5, rtol=1e-5)
        assert not any(layer.merged for layer in pm.model.modules() if hasattr(layer, "merged_adapters"))
        torch.testing.assert_close(pm(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_generate_works_and_matches_the_hf_model():
    pm, _, _ = wrapped("gpt2")
    prompt = torch.tensor([[5, 6, 7]])
    out = pm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :3], prompt)
    merged = pm.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), out)
    t5 = get_peft_model(make("t5"), QV)
    assert t5.generate(input_ids=prompt, max_new_tokens=4, do_sample=False).shape[0] == 1


def test_peft_paths_and_attribute_passthrough():
    pm, _, _ = wrapped("gpt2")
    assert pm.base_model.model is pm.get_base_model()
    assert pm.config.model_type == "gpt2"
    assert isinstance(pm, LoraModel)


def test_print_trainable_parameters_format(capsys):
    pm, _, _ = wrapped("gpt2")
    pm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 4 * 2 * (4 * 32 + 32 * 4)  # 4 layers × (q, v) × (A + B)
    assert f"{trainable:,d}" in line and f"{total:,d}" in line


def test_parameter_breakdown_adds_up_and_finds_each_component():
    pm = get_peft_model(make("gpt2"), presets.article(target_modules=["q", "v"]))
    rows = pm.parameter_breakdown()
    total = rows.pop("total")
    assert sum(r["params"] for r in rows.values()) == total["params"] == sum(p.numel() for p in pm.parameters())
    assert sum(r["trainable"] for r in rows.values()) == pm.get_nb_trainable_parameters()[0]
    assert rows["other"]["params"] == 0
    d, layers, vocab = 32, 4, 128
    assert rows["attention"]["params"] == layers * (d * 3 * d + 3 * d + d * d + d)
    assert rows["ffn"]["params"] == layers * (d * 4 * d + 4 * d + 4 * d * d + d)
    assert rows["norm"]["params"] == (2 * layers + 1) * 2 * d
    assert rows["embeddings"]["params"] == vocab * d + 64 * d and rows["embeddings"]["trainable"] == 0
    assert rows["head"]["params"] == rows["head"]["trainable"] == vocab * d  # the untied copy
    assert "| lora |" in format_breakdown(pm.parameter_breakdown())


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    pm = get_peft_model(make("gpt2"), LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v", "ffn"]))
    losses = train_losses(pm)
    assert losses[-1] < losses[0] - 0.3  # nats; a random tiny GPT-2 starts at ln(128) ≈ 4.85
    k = pm.model.transformer.h[0].attn.c_attn
    assert set(k.parts["default"]) == {"q", "v"}  # K was never part of training


def test_merge_and_unload_progressbar_shows_the_layers_and_changes_nothing(capsys):
    torch.manual_seed(0)
    quiet, shown = (get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
                    for _ in range(2))
    shown.load_state_dict(quiet.state_dict())
    inputs = batch("llama")
    plain = logits(quiet.merge_and_unload(), inputs)
    capsys.readouterr()
    with_bar = logits(shown.merge_and_unload(progressbar=True), inputs)
    assert "merging" in capsys.readouterr().err
    torch.testing.assert_close(with_bar, plain, rtol=0, atol=0)
