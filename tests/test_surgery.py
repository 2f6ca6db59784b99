"""Which modules get which adapter: roles per family, layer selection, bands, and the errors."""

import pytest
import torch

from conftest import batch, logits, make
from minilora import Band, LoraConfig, LoraLinear, get_peft_model, presets
from minilora.presets import ARTICLE_BANDS
from minilora.lora import FULL
from minilora.roles import classify, parse_selector
from minilora.surgery import resolve_targets


def plan(family, **kw):
    return resolve_targets(make(family), LoraConfig(**kw))


def ranks(p):
    return {name: {part_name: part.r for part_name, part in parts.items()} for name, parts in p.items()}


def test_gpt2_q_v_are_slices_of_c_attn_and_k_is_left_out():
    p = plan("gpt2", target_modules=["q", "v"])  # n_embd = 32
    assert set(p) == {f"transformer.h.{i}.attn.c_attn" for i in range(4)}
    columns = {name: (part.first, part.end) for name, part in p["transformer.h.0.attn.c_attn"].items()}
    assert columns == {"q": (0, 32), "v": (64, 96)}


def test_c_attn_keeps_peft_meaning_and_mixing_whole_and_slices_is_an_error():
    p = plan("gpt2", target_modules=["c_attn"])
    assert all(set(parts) == {FULL} for parts in p.values())
    with pytest.raises(ValueError, match="targeted whole and by slice"):
        plan("gpt2", target_modules=["c_attn", "q"])


@pytest.mark.parametrize(
    "family, selector, expected",
    [
        ("llama", "o", {"model.layers.0.self_attn.o_proj"}),
        ("llama", "ffn", {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}),
        ("bert", "v", {"bert.encoder.layer.0.attention.self.value"}),
        ("bert", "down", {"bert.encoder.layer.0.output.dense"}),
        ("bert", "o", {"bert.encoder.layer.0.attention.output.dense"}),
        ("t5", "cross_q", {"decoder.block.0.layer.1.EncDecAttention.q"}),
        ("t5", "q", {"encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
                     "decoder.block.0.layer.1.EncDecAttention.q"}),
        ("t5", "decoder.self_v", {"decoder.block.0.layer.0.SelfAttention.v"}),
        ("bart", "cross_v", {"model.decoder.layers.0.encoder_attn.v_proj"}),
        ("bart", "encoder.o", {"model.encoder.layers.0.self_attn.out_proj"}),
        ("bart", "up", {"model.encoder.layers.0.fc1", "model.decoder.layers.0.fc1"}),
    ],
)
def test_roles_resolve_per_family(family, selector, expected):
    chosen = {n for n in plan(family, target_modules=[selector], layers_to_transform=[0])}
    assert chosen == expected


def test_selector_grammar():
    assert parse_selector("decoder.cross_v").roles == ("v",)
    assert parse_selector("ffn").roles == ("up", "down", "gate")
    assert parse_selector("c_attn") is None and parse_selector("cross_up") is None


def test_layers_to_transform_and_layers_pattern():
    assert set(plan("llama", target_modules=["q_proj"], layers_to_transform=[1, 3])) == {
        "model.layers.1.self_attn.q_proj", "model.layers.3.self_attn.q_proj"}
    assert set(plan("gpt2", target_modules=["c_fc"], layers_to_transform=2, layers_pattern="h")) == {
        "transformer.h.2.mlp.c_fc"}


def test_layer_bands_scale_with_depth():
    cfg = dict(target_modules=["q", "v"], layer_bands=ARTICLE_BANDS)
    for depth in (4, 8, 12):
        p = resolve_targets(make("gpt2", n_layer=depth), LoraConfig(**cfg))
        by_layer = {int(n.split(".")[2]): set(r.values()) for n, r in ranks(p).items()}
        assert sorted(by_layer) == list(range(depth // 2, depth))  # lower half: no LoRA
        assert by_layer[depth // 2] == {8} and by_layer[depth - 1] == {16}


def test_article_preset_is_one_line_and_unties_the_head():
    model = make("gpt2", n_layer=8)
    wte = model.transformer.wte.weight
    with pytest.warns(UserWarning, match="untied so the embeddings stay frozen"):
        pm = get_peft_model(model, presets.article())
    assert not wte.requires_grad
    head = pm.model.lm_head.modules_to_save["default"].weight
    assert head.requires_grad and head.data_ptr() != wte.data_ptr()
    out = pm(**batch("gpt2"), labels=batch("gpt2")["input_ids"])
    out.loss.backward()
    assert wte.grad is None and head.grad is not None


def test_component_ranks_for_encoder_decoders():
    sizes = {"encoder_self": (2, 4), "decoder_self": (4, 8), "cross": (8, 16)}
    for family in ("t5", "bart"):
        model = make(family)
        sites = classify(model)
        p = resolve_targets(model, LoraConfig(target_modules=["q", "v"], component_ranks=sizes))
        by_component = {}
        for name, parts in p.items():
            by_component.setdefault(sites[name].component, set()).update(part.r for part in parts.values())
        assert by_component == {"encoder_self": {2}, "decoder_self": {4}, "cross": {8}}


def test_rank_pattern_alpha_pattern_exclude_all_linear_and_regex():
    p = plan("llama", target_modules="all-linear", rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3},
             exclude_modules=["k_proj"])
    assert "lm_head" not in p and not any(n.endswith("k_proj") for n in p)
    assert p["model.layers.0.mlp.down_proj"][FULL].r == 2
    assert p["model.layers.0.self_attn.q_proj"][FULL].alpha == 3
    assert set(plan("llama", target_modules=r".*\.1\.self_attn\.(q|v)_proj")) == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_classify_sees_wrapped_layers_as_sites():
    pm = get_peft_model(make("gpt2"), LoraConfig(target_modules=["q", "v"]))
    sites = classify(pm.model)
    assert "transformer.h.0.attn.c_attn" in sites and not any("lora_" in n or "base_layer" in n for n in sites)
    pm.add_adapter("second", LoraConfig(target_modules=["k"]))
    layer = pm.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and set(layer.parts) == {"default", "second"}


# ---------------------------------------------------------------- bad input, clear errors
def test_misspelt_target_lists_nearest_names_and_roles():
    with pytest.raises(ValueError) as err:
        plan("gpt2", target_modules=["c_atn"])
    msg = str(err.value)
    assert "'c_atn'" in msg and "c_attn" in msg and "Roles for gpt2: q, k, v, o, up, down" in msg


def test_role_missing_in_family_is_an_error():
    with pytest.raises(ValueError, match="'gate' matched no module.*Roles for gpt2"):
        plan("gpt2", target_modules=["gate"])
    with pytest.raises(ValueError, match="'cross_q' matched no module"):
        plan("llama", target_modules=["cross_q"])


def test_an_entry_that_matches_nothing_is_named_in_a_warning_and_a_list_that_matches_nothing_is_an_error():
    with pytest.warns(UserWarning, match="'v_prj' matched no module.*nearest module names: .*v_proj"):
        p = plan("llama", target_modules=["q_proj", "v_prj"])  # PEFT adapts q_proj silently
    assert p and all(name.endswith("q_proj") for name in p)
    with pytest.raises(ValueError, match="'nonexistent'"):
        plan("llama", target_modules=["nonexistent", "also_missing"])


def test_out_of_range_layers_and_unused_exclusions_are_warnings():
    with pytest.warns(UserWarning, match=r"layers_to_transform has \[7\].*select nothing"):
        p = plan("llama", target_modules=["q_proj"], layers_to_transform=[1, 7])
    assert sorted(p) == ["model.layers.1.self_attn.q_proj"]
    with pytest.warns(UserWarning, match="exclude_modules=.*excluded no module"):
        plan("llama", target_modules=["q_proj"], exclude_modules=["nowhere"])


@pytest.mark.parametrize("kw, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -2}, "r must be a positive integer"),
    ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"bias": "some"}, "bias must be"),
    ({"layer_bands": [Band(0.5, 1.0, 8, 16)], "layers_to_transform": [1]}, "drop layers_to_transform"),
])
def test_invalid_config_values(kw, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["q"], **kw)


def test_band_must_be_a_depth_range():
    with pytest.raises(ValueError, match="0.0 <= start < end <= 1.0"):
        Band(0.8, 0.5, 8, 16)


def test_layer_out_of_range_says_the_depth():
    with pytest.warns(UserWarning, match=r"has \[9\], but the model has 4 layers \(indices 0..3\)"):
        plan("gpt2", target_modules=["c_attn"], layers_to_transform=[1, 9])


def test_unknown_modules_to_save():
    with pytest.raises(ValueError, match="modules_to_save entry 'lm_haed'.*lm_head"):
        get_peft_model(make("gpt2"), LoraConfig(target_modules=["q"], modules_to_save=["lm_haed"]))


def test_bias_modes():
    def trainable(bias):
        pm = get_peft_model(make("gpt2"), LoraConfig(target_modules=["c_attn"], bias=bias))
        return {n for n, p in pm.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable("none") == set()
    assert trainable("lora_only") == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(4)}
    assert "transformer.h.0.mlp.c_fc.bias" in trainable("all")


def test_gradients_reach_only_adapters_and_modules_to_save():
    pm = get_peft_model(make("bert"), LoraConfig(target_modules=["q", "v"], task_type="SEQ_CLS"))
    pm.train()
    inputs = batch("bert")
    pm(**inputs, labels=torch.tensor([0, 2])).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n or ".modules_to_save.default." in n for n in with_grad)
    assert any("classifier.modules_to_save" in n for n in with_grad)


def test_phi3_fused_qkv_and_gate_up_are_sliced_by_the_config_sizes():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    p = resolve_targets(model, LoraConfig(r=2, target_modules=["v", "up"]))
    qkv = {name: (part.first, part.end) for name, part in p["model.layers.0.self_attn.qkv_proj"].items()}
    assert qkv == {"v": (32 + 16, 32 + 16 + 16)}  # q: 4 heads × 8, k and v: 2 heads × 8
    gate_up = {name: (part.first, part.end) for name, part in p["model.layers.0.mlp.gate_up_proj"].items()}
    assert gate_up == {"up": (48, 96)}
    ids = torch.randint(0, 64, (1, 6))
    expected = logits(model, {"input_ids": ids})
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["v", "up"], init_lora_weights=False))
    assert not torch.allclose(logits(pm, {"input_ids": ids}), expected)


def test_unknown_family_uses_module_names_and_says_roles_are_unavailable():
    model = torch.nn.Sequential()
    model.add_module("encoder_proj", torch.nn.Linear(8, 8))
    model.add_module("head", torch.nn.Linear(8, 4))
    assert set(resolve_targets(model, LoraConfig(r=2, target_modules=["encoder_proj"]))) == {"encoder_proj"}
    with pytest.raises(ValueError, match="'q' matched no module.*no family minilora knows.*use module names"):
        resolve_targets(model, LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match="target_modules is required"):
        resolve_targets(model, LoraConfig(r=2))


@pytest.mark.parametrize("family, options", [
    ("llama", dict(target_modules=["q_proj", "v_proj"])), ("gpt2", dict(target_modules=["q", "v"])),
    ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn"], trainable_token_indices=[3, 5])),  # GPT-2's head is tied: two wrappers
    ("bert", dict(target_modules=["query"], task_type="SEQ_CLS", trainable_token_indices={"word_embeddings": [4]})),
])
def test_wrapping_walks_the_model_twice(family, options):
    """Once to see whether an earlier LoraModel left adapter layers, once to read into the plan every
    target site (linear layers, embeddings, convolutions, 3-D expert weights), the modules trained in
    full (PEFT's task heads among them) and the embeddings with trainable tokens."""
    model = make(family)
    calls = []
    children = model.named_children
    model.named_children = lambda *a, **k: calls.append(1) or children(*a, **k)  # each walk starts here
    pm = get_peft_model(model, LoraConfig(r=2, **options))
    assert len(calls) == 2
    wrapped = {name.rsplit(".", 1)[-1] for name, m in pm.named_modules() if type(m).__name__ in ("ModulesToSave", "TrainableTokens")}
    expected = {"lm_head"} if "modules_to_save" in options else set()
    expected |= {"wte", "lm_head"} if family == "gpt2" and "trainable_token_indices" in options else set()
    expected |= {"word_embeddings"} if family == "bert" else set()
    assert wrapped == expected | ({"classifier"} if family == "bert" else set())
