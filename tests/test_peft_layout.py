"""From the outside a minilora model is a PEFT model: the same module tree (`base_model.model` is the
HF model), the same parameter and state-dict names and shapes, the same layer attributes, and state
dicts that load with strict=True from one library into the other. Every case runs PEFT itself."""

import copy

import peft
import pytest
import torch

import minilora
from conftest import batch, logits, make
from minilora.lora import LoraLinear

CASES = {  # family -> LoraConfig keywords, as PEFT users write them
    "gpt2": dict(target_modules=["c_attn"], task_type="CAUSAL_LM"),
    "llama": dict(target_modules="all-linear", task_type="CAUSAL_LM"),
    "bert": dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    "bert dora": dict(target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"),
}


def both(case: str, **overrides):
    """(base, PEFT's model, minilora's model) from one base model and one config, B non-zero."""
    family = case.split()[0]
    base = make(family)
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **CASES[case], **overrides}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **copy.deepcopy(kwargs)))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**copy.deepcopy(kwargs)))
    return base, theirs.eval(), ours.eval()


def shapes(model) -> dict:
    return {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_same_names_shapes_and_module_tree_as_peft(case):
    _, theirs, ours = both(case)
    assert shapes(ours) == shapes(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert type(ours.base_model.model) is type(theirs.base_model.model)
    assert ours.base_model.model is ours.get_base_model()
    assert [n for n, m in ours.named_modules() if isinstance(m, LoraLinear)] == \
        [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
         and not isinstance(m, peft.tuners.lora.layer.Embedding)]


@pytest.mark.parametrize("case", list(CASES))
def test_a_state_dict_of_either_library_loads_strictly_into_the_other(case):
    base, theirs, ours = both(case)
    inputs = batch(case.split()[0])
    assert (logits(theirs, inputs) - logits(base, inputs)).abs().max() > 1e-3  # PEFT's adapter acts
    assert not any(ours.load_state_dict(theirs.state_dict(), strict=True))
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)

    _, theirs, ours = both(case)  # and back: minilora's weights (its own random A and B) into PEFT
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.split(".")[-2] == "default" and "lora_B" in name:
                p.normal_(0, 0.1)  # a B away from zero, so the adapter acts
    assert not any(theirs.load_state_dict(ours.state_dict(), strict=True))
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-5, rtol=1e-5)


def test_layer_attributes_are_peft_s():
    _, theirs, ours = both("llama", lora_dropout=0.1, use_rslora=True, rank_pattern={"down_proj": 2})
    their_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    checked = 0
    for path, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, LoraLinear)):
        peer = their_layers[path]
        assert type(layer.base_layer) is type(peer.base_layer)
        assert layer.r == peer.r and layer.lora_alpha == peer.lora_alpha and layer.use_dora == peer.use_dora
        assert layer.scaling == pytest.approx(peer.scaling)
        assert {k: type(v) for k, v in layer.lora_dropout.items()} == {k: type(v) for k, v in peer.lora_dropout.items()}
        assert layer.lora_dropout["default"].p == peer.lora_dropout["default"].p
        for side in ("lora_A", "lora_B"):
            mine, theirs_ = getattr(layer, side)["default"], getattr(peer, side)["default"]
            assert type(mine) is type(theirs_) and mine.weight.shape == theirs_.weight.shape
        assert layer.active_adapters == peer.active_adapters and layer.disable_adapters == peer.disable_adapters
        assert layer.merged == peer.merged and layer.merged_adapters == peer.merged_adapters
        checked += 1
    assert checked == len(their_layers) > 0
    for model in (ours, theirs):
        model.merge_adapter()
    for path, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, LoraLinear)):
        assert layer.merged and layer.merged_adapters == their_layers[path].merged_adapters == ["default"]


def test_a_slice_adds_a_level_below_the_adapter_and_whole_layers_are_unchanged():
    model = minilora.get_peft_model(make("gpt2"), minilora.LoraConfig(r=2, target_modules=["q", "v", "c_fc"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.q.weight" in names
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.v.weight" in names
    assert "base_model.model.transformer.h.0.mlp.c_fc.lora_A.default.weight" in names
    layer = model.model.transformer.h[0].attn.c_attn
    assert set(layer.scaling["default"]) == {"q", "v"} and layer.r["default"] == {"q": 2, "v": 2}
    assert isinstance(model.model.transformer.h[0].mlp.c_fc.scaling["default"], float)


def test_state_dicts_with_the_earlier_names_still_load_with_a_warning():
    """Earlier releases named parameters `model.<path>` and a whole-layer pair `lora_A.<adapter>.full.weight`."""
    _, _, ours = both("gpt2")
    state = ours.state_dict()

    def earlier(name: str) -> str:
        name = name.replace("base_model.model.", "model.", 1)
        return name.replace(".default.weight", ".default.full.weight") if ".lora_" in name else name

    old = {earlier(k): torch.randn_like(v) if ".lora_" in k else v for k, v in state.items()}
    with pytest.warns(FutureWarning, match="earlier parameter names"):
        result = ours.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in ours.state_dict().items():
        assert torch.equal(value, old[earlier(key)]), key


def test_calling_base_model_runs_the_hf_model_with_the_adapters():
    base, theirs, ours = both("gpt2")
    ours.load_state_dict(theirs.state_dict())
    inputs = batch("gpt2")
    assert (logits(ours, inputs) - logits(base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(ours.base_model(**inputs).logits, ours(**inputs).logits)
    torch.testing.assert_close(ours.base_model(**inputs).logits, theirs.base_model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert ours.base_model.peft_config is ours.peft_config  # the tuner level reaches the wrapper's state
    assert ours.base_model.config is ours.model.config
