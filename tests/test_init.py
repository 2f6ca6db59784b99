"""PiSSA, OLoRA and orthogonal starts: the model computes what the base did, and A, B, W_res are PEFT's."""

import copy

import peft
import pytest
import torch

import minilora
from conftest import batch, logits, make
from minilora import NF4Config, quantize_model
from minilora.lora import LoraLinear

INITS = ["pissa", "pissa_niter_4", "olora", "orthogonal"]
CASES = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}  # Conv1D / Linear


def _layers(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def _wrap(family, init, **kw):
    base = make(family)
    config = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[family], init_lora_weights=init, **kw)
    torch.manual_seed(0)
    return base, minilora.get_peft_model(copy.deepcopy(base), config).eval()


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("init", INITS)
def test_the_model_at_init_computes_what_the_base_did(family, init):
    base, ours = _wrap(family, init)
    inputs = batch(family)
    torch.testing.assert_close(logits(ours, inputs), logits(base, inputs), atol=1e-5, rtol=1e-4)
    for layer in _layers(ours.model).values():
        B = layer.lora_B["default"].weight
        assert B.abs().max() > 1e-3  # B is not zero: the adapter's start is not LoRA's
    changed = [not torch.equal(layer.base_layer.weight, base.get_submodule(path).weight)
               for path, layer in _layers(ours.model).items()]
    assert all(changed) if init != "orthogonal" else not any(changed)  # PiSSA and OLoRA rewrite the base


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merging_gives_back_the_original_weights_and_training_moves_them(init):
    base, ours = _wrap("gpt2", init, use_rslora=True)
    merged = copy.deepcopy(ours).merge_and_unload()
    for (name, p), (name2, q) in zip(base.named_parameters(), merged.named_parameters()):
        assert name == name2
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)  # W_res + s·B·A = W
    ids = batch("gpt2")["input_ids"]
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    first = None
    for _ in range(10):
        loss = ours(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        loss.backward(), opt.step(), opt.zero_grad()
    assert loss.item() < first


# ---------------------------------------------------------------------------------------------- PEFT
def _decaying_spectrum(model):
    """Give every weight singular values 1, 1/2, 1/4, ...: a top-r subspace that is well defined."""
    g = torch.Generator().manual_seed(7)
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in CASES["gpt2"] + CASES["llama"]:
            rows, cols = module.weight.shape
            U, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g))
            V, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g))
            module.weight.data = U @ torch.diag(0.5 ** torch.arange(min(rows, cols)).float()) @ V.T


def _both(family, init, spectrum=False, **kw):
    base = make(family)
    if spectrum:
        _decaying_spectrum(base)
    kwargs = dict(r=4, lora_alpha=8, target_modules=CASES[family], init_lora_weights=init, **kw)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    torch.manual_seed(0)
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs)).eval()
    their_params = dict(theirs.named_parameters())
    pairs = []
    for path, layer in _layers(ours.model).items():
        prefix = f"base_model.model.{path}"
        pairs.append((layer, their_params[f"{prefix}.lora_A.default.weight"],
                      their_params[f"{prefix}.lora_B.default.weight"], their_params[f"{prefix}.base_layer.weight"]))
    return base, theirs, ours, pairs


# PEFT's OLoRA factorises a Conv1D's stored (d_in, d_out) matrix as if it were W, which breaks GPT-2's
# layers; minilora factorises W itself, so OLoRA is compared on Linear layers only.
@pytest.mark.parametrize("family,init", [("gpt2", "pissa"), ("llama", "pissa"), ("llama", "olora")])
@pytest.mark.parametrize("rslora", [False, True])
def test_exact_inits_equal_peft(family, init, rslora):
    _, theirs, ours, pairs = _both(family, init, use_rslora=rslora)
    for layer, A, B, W in pairs:
        torch.testing.assert_close(layer.lora_A["default"].weight, A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B["default"].weight, B, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight, W, atol=1e-6, rtol=1e-5)
    inputs = batch(family)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(CASES))
def test_randomized_pissa_spans_peft_subspace(family):
    _, theirs, ours, pairs = _both(family, "pissa_niter_8", spectrum=True)
    for layer, A, B, W in pairs:
        s = layer.scaling["default"]
        ours_A, ours_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        W_ours = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
        W_theirs = W.T if layer.fan_in_fan_out else W
        torch.testing.assert_close(W_ours + s * ours_B @ ours_A, W_theirs + s * B @ A, atol=1e-5, rtol=1e-4)
        P_ours = ours_B @ torch.linalg.pinv(ours_B)  # projector on the column space of B (the top r left vectors)
        P_theirs = B @ torch.linalg.pinv(B)
        torch.testing.assert_close(P_ours, P_theirs, atol=1e-3, rtol=1e-3)
    inputs = batch(family)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(CASES))
def test_orthogonal_draws_peft_a_and_b_for_a_seed(family):
    _, theirs, ours, _ = _both(family, True)
    their_layers = {path.removeprefix("base_model.model."): m for path, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    for path, layer in _layers(ours.model).items():
        torch.manual_seed(5)
        their_layers[path].orthogonal_init("default")
        torch.manual_seed(5)
        layer.reset_adapter("default", "orthogonal")
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(A, their_layers[path].lora_A["default"].weight)
        torch.testing.assert_close(B, their_layers[path].lora_B["default"].weight)
        assert (B @ A).abs().max() < 1e-6 and A.abs().min() > 0


# ---------------------------------------------------------------------------------------------- refusals
def test_refusals_say_what_to_do():
    with pytest.raises(ValueError, match="needs a whole layer.*module name"):
        minilora.get_peft_model(make("gpt2"), minilora.LoraConfig(r=4, target_modules=["q", "v"],
                                                                  init_lora_weights="pissa"))
    with pytest.raises(ValueError, match=r"r may be at most min\(d_out, d_in\) = 32"):
        minilora.get_peft_model(make("llama"), minilora.LoraConfig(r=40, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="needs an even rank"):
        minilora.get_peft_model(make("llama"), minilora.LoraConfig(r=3, target_modules=["q_proj"],
                                                                   init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="'olora', 'orthogonal' or 'loftq', got 'pisa'"):
        minilora.LoraConfig(init_lora_weights="pisa")
    model = make("llama")
    quantize_model(model, NF4Config(blocksize=32), skip_modules=["lm_head"])
    with pytest.raises(ValueError, match="quantized here; initialise on the full-precision model"):
        minilora.get_peft_model(model, minilora.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))


# ---------------------------------------------------------------------------------------------- saving
def _train(model, steps=5):
    ids = batch("gpt2")["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(), opt.zero_grad()
    return model.eval()


def test_a_saved_pissa_adapter_reloads_on_its_residual_base_without_factorising_it_again(tmp_path):
    _, ours = _wrap("gpt2", "pissa")
    _train(ours)
    ours.save_pretrained(tmp_path)
    residual = copy.deepcopy(ours).unload()
    reloaded = minilora.LoraModel.from_pretrained(residual, tmp_path)
    assert reloaded.peft_config["default"].init_lora_weights == "pissa"
    inputs = batch("gpt2")
    torch.testing.assert_close(logits(reloaded, inputs), logits(ours, inputs), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family,init,rslora", [("gpt2", "pissa", False), ("llama", "olora", True)])
def test_conversion_to_plain_lora_loads_on_the_original_base_and_equals_peft(tmp_path, family, init, rslora):
    base = make(family)
    kwargs = dict(r=4, lora_alpha=8, target_modules=CASES[family], init_lora_weights=init, use_rslora=rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's own recipe before saving the start
    theirs.save_pretrained(tmp_path / "theirs_init")
    ours.save_pretrained(tmp_path / "ours_init")
    _train(ours)
    _copy(ours, theirs)
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=tmp_path / "theirs_init")
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours_init")

    from safetensors.torch import load_file
    mine, peft_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == peft_saved.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], peft_saved[key], atol=1e-6, rtol=1e-5)
    mine_cfg, peft_cfg = (peft.LoraConfig.from_pretrained(tmp_path / d) for d in ("ours", "theirs"))
    assert (mine_cfg.r, mine_cfg.lora_alpha, mine_cfg.init_lora_weights) == \
           (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.init_lora_weights) == (8, 8 * (2 ** 0.5 if rslora else 2), True)

    inputs = batch(family)
    trained = logits(ours, inputs)
    for loaded in (minilora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()):
        torch.testing.assert_close(logits(loaded, inputs), trained, atol=1e-5, rtol=1e-4)


def _copy(ours, theirs):
    """minilora's A and B into PEFT's model, layer by layer."""
    their_params = dict(theirs.named_parameters())
    for path, layer in _layers(ours.model).items():
        prefix = f"base_model.model.{path}"
        their_params[f"{prefix}.lora_A.default.weight"].data.copy_(layer.lora_A["default"].weight)
        their_params[f"{prefix}.lora_B.default.weight"].data.copy_(layer.lora_B["default"].weight)


def test_conversion_refusals(tmp_path):
    _, ours = _wrap("gpt2", "pissa")
    ours.save_pretrained(tmp_path / "init")
    _, other = _wrap("llama", "pissa")
    with pytest.raises(ValueError, match="the initial adapter lacks"):
        other.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")
    _, ours = _wrap("gpt2", "pissa", use_rslora=True, rank_pattern={"c_fc": 2})
    with pytest.raises(ValueError, match="together with use_rslora=True"):
        ours.save_pretrained(tmp_path / "y", path_initial_model_for_weight_conversion=tmp_path / "init")
