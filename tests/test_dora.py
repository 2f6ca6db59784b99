"""DoRA (use_dora=True): exact at init, merge, PEFT parity (outputs, gradients, files), NF4, slices."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import batch, logits, make
from minilora import LoraConfig, LoraModel, get_peft_model, quantize_model
from minilora.lora import LoraLinear

CASES = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def based(family):
    """A tiny model whose biases are not zero (GPT-2 starts with zero biases), so that a wrong
    handling of b in DoRA shows."""
    model = make(family)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def layers(model):
    return {path: m for path, m in model.model.named_modules() if isinstance(m, LoraLinear)}


def both(family, seed=0):
    """PEFT's and minilora's DoRA on the same base; PEFT's A, B and m (m moved off ‖W + sBA‖, so
    that g ≠ 1 and DoRA differs from plain LoRA) copied into minilora's."""
    kw = dict(r=4, lora_alpha=8, target_modules=CASES[family], lora_dropout=0.0, use_dora=True)
    base = based(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    params = dict(theirs.named_parameters())
    for path, layer in layers(ours).items():
        m = params[f"base_model.model.{path}.lora_magnitude_vector.default.weight"]
        with torch.no_grad():
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
        for side in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(layer, side)["default"].weight.data.copy_(params[f"base_model.model.{path}.{side}.default.weight"])
    return base, theirs.eval(), ours.eval()


def randomize(model, seed=0):
    """Non-zero B and m away from the norm, for every DoRA adapter of `model`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            for name in layer.lora_magnitude_vector:
                for part in layer.parts[name]:
                    magnitude, B = layer.magnitude(name, part), layer.pair(name, part)[1].weight
                    B.copy_(0.1 * torch.randn(B.shape, generator=g))
                    magnitude.weight.mul_(1 + 0.2 * torch.randn(magnitude.weight.shape, generator=g))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["c_attn"], ["q", "v"]])
def test_dora_at_init_is_the_base_bit_for_bit(targets):
    family = "llama" if targets[0] == "q_proj" else "gpt2"
    base = based(family)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, use_dora=True))
    inputs = batch(family)
    # g = m / ‖W + s·0·A‖ divides a norm by the same norm, computed the same way: exactly 1.
    assert torch.equal(logits(model, inputs), logits(base, inputs))
    layer = next(iter(layers(model).values()))
    W = layer.base_layer.weight.detach()
    W = W.t() if layer.fan_in_fan_out else W  # (d_out, d_in)
    for part, p in layer.parts["default"].items():
        magnitude = layer.magnitude("default", part)
        assert torch.equal(magnitude.weight.detach(), W[p.first:p.end].norm(dim=1))


@pytest.mark.parametrize("family", list(CASES))
def test_same_outputs_and_gradients_as_peft(family):
    base, theirs, ours = both(family)
    inputs = batch(family)
    assert (logits(ours, inputs) - logits(base, inputs)).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    for model in (theirs, ours):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    their_params = dict(theirs.named_parameters())
    checked = 0
    for path, layer in layers(ours).items():
        for side in ("lora_A", "lora_B", "lora_magnitude_vector"):
            grad = getattr(layer, side)["default"].weight.grad
            expected = their_params[f"base_model.model.{path}.{side}.default.weight"].grad
            assert grad.abs().max() > 0
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["c_attn"], ["q", "v"]])
def test_merged_equals_unmerged_and_unmerge_restores_the_base(targets):
    family = "llama" if targets[0] == "q_proj" else "gpt2"
    base = based(family)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, use_dora=True)).eval()
    randomize(model)
    inputs = batch(family)
    unmerged = logits(model, inputs)
    weights = {p: layer.base_layer.weight.detach().clone() for p, layer in layers(model).items()}
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), logits(base, inputs))
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(layer.base_layer.weight, weights[p]) for p, layer in layers(model).items())
    model.unmerge_adapter()
    for path, layer in layers(model).items():
        assert torch.equal(layer.base_layer.weight, weights[path])
    assert torch.equal(logits(model, inputs), unmerged)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_merged_rows_are_the_dora_weight_and_k_stays_bit_identical():
    model = get_peft_model(based("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], use_dora=True))
    randomize(model)
    layer = layers(model)["transformer.h.3.attn.c_attn"]
    W = layer.base_layer.weight.detach().t().clone()  # (3d, d)
    layer.merge(["default"])
    merged = layer.base_layer.weight.detach().t()
    d = W.shape[1]
    assert torch.equal(merged[d:2 * d], W[d:2 * d])  # K's rows
    for part in ("q", "v"):
        p = layer.parts["default"][part]
        V = W[p.first:p.end] + layer.delta_weight("default", part)
        m = layer.magnitude("default", part).weight.detach()
        torch.testing.assert_close(merged[p.first:p.end], m[:, None] * V / V.norm(dim=1, keepdim=True))


def reference(layer, W, x, name="default"):
    """DoRA by hand from the dense fp32 weight W (d_out, d_in), part by part, norm detached:
    y = x Wᵀ + b, then in each part's columns (m / ‖W_p + sBA‖) ⊙ (x W_pᵀ + s·x AᵀBᵀ) + b_p."""
    bias = layer.base_layer.bias
    b = bias.detach().float() if bias is not None else torch.zeros(W.shape[0])
    y = x @ W.t() + b
    out = [y[:, i:i + 1] for i in range(W.shape[0])]
    for part, p in layer.parts[name].items():
        A, B = (module.weight for module in layer.pair(name, part))
        s = layer.part_scale(name, part)
        norm = (W[p.first:p.end] + s * B @ A).norm(dim=1).detach()
        g = layer.magnitude(name, part).weight / norm
        rows = g * (x @ W[p.first:p.end].t() + s * (x @ A.t()) @ B.t()) + b[p.first:p.end]
        out[p.first:p.end] = [rows[:, i:i + 1] for i in range(p.width)]
    return torch.cat(out, dim=1)


def test_slices_match_a_hand_computed_reference_and_leave_k_bit_identical():
    model = get_peft_model(based("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], use_dora=True)).eval()
    randomize(model)
    layer = layers(model)["transformer.h.1.attn.c_attn"]
    assert set(layer.lora_magnitude_vector["default"]) == {"q", "v"}
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, base = layer(x), layer.base_layer(x)
        expected = reference(layer, layer.base_layer.weight.detach().t(), x)
    d = layer.in_features
    assert torch.equal(y[:, d:2 * d], base[:, d:2 * d])
    assert not torch.allclose(y[:, :d], base[:, :d], atol=1e-3)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, path", [("llama", "model.layers.2.self_attn.q_proj"),
                                          ("gpt2", "transformer.h.2.attn.c_attn")])
def test_over_nf4_matches_a_dequantized_float_reference_outputs_and_gradients(family, path):
    base = based(family)
    quantize_model(base)  # in place
    model = get_peft_model(base, LoraConfig(r=4, target_modules=CASES[family], use_dora=True))
    layer = layers(model)[path]
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # at init, exactly the NF4 base
    randomize(model)
    W = layer.base_layer.dequantized_weight(torch.float32)  # (d_out, d_in)
    y = layer(x)
    expected = reference(layer, W, x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert (y - layer.base_layer(x)).abs().max() > 1e-3
    weights = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
               layer.lora_magnitude_vector["default"].weight]
    grads = torch.autograd.grad(y.square().sum(), weights)
    expected_grads = torch.autograd.grad(expected.square().sum(), weights)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)
    inputs = batch(family)
    unmerged = logits(model, inputs)
    torch.testing.assert_close(logits(model.merge_and_unload(), inputs), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(CASES))
def test_files_both_ways_with_peft(family, tmp_path):
    base, theirs, ours = both(family)
    inputs = batch(family)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert loaded.peft_config["default"].use_dora
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    keys = [set(load_file(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours")]
    assert keys[0] == keys[1] and any(k.endswith(".lora_magnitude_vector") for k in keys[0])
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, inputs), logits(ours, inputs), atol=1e-5, rtol=1e-5)
    mine = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert torch.equal(logits(mine, inputs), logits(ours, inputs))


def test_a_sliced_dora_adapter_saves_as_whole_layer_dora_that_peft_computes_alike(tmp_path):
    """Norms are per output row, so q and v's DoRA is a whole-layer DoRA whose K rows keep m = ‖W_k‖."""
    model = get_peft_model(based("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], use_dora=True)).eval()
    randomize(model)
    inputs = batch("gpt2")
    model.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(based("gpt2"), tmp_path).eval()
    torch.testing.assert_close(logits(back, inputs), logits(model, inputs), atol=1e-5, rtol=1e-5)
    mine = LoraModel.from_pretrained(based("gpt2"), tmp_path).eval()
    assert set(layers(mine)["transformer.h.1.attn.c_attn"].lora_magnitude_vector["default"]) == {"q", "v"}
    torch.testing.assert_close(logits(mine, inputs), logits(model, inputs), atol=1e-6, rtol=1e-6)
    tensors = load_file(tmp_path / "adapter_model.safetensors")  # K's rows rescaled: not slices any more
    key = next(k for k in tensors if k.endswith("h.1.attn.c_attn.lora_magnitude_vector"))
    d = layers(model)["transformer.h.1.attn.c_attn"].in_features
    tensors[key][d:2 * d] *= 1.5
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="rows outside the slices"):
        LoraModel.from_pretrained(based("gpt2"), tmp_path)


def test_mixed_batches_run_dora_exactly_and_adapter_weights_scale_its_change():
    base = make("llama")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)).eval()
    randomize(model)
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))
    inputs = batch("llama")
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "plain"]).logits  # each row: its adapter alone
        for row, name in enumerate(["default", "plain"]):
            with model.adapters_acting([name]):
                one = model(**{k: v[row:row + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(mixed[row:row + 1], one, rtol=1e-5, atol=1e-6)
        assert torch.equal(model(**inputs, adapter_weights={"default": 1.0}).logits, logits(model, inputs))
        assert torch.equal(model(**inputs, adapter_weights={"default": 0.0}).logits, logits(base, inputs))
    with pytest.raises(ValueError, match="cannot combine DoRA adapters"):
        model.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "mix", combination_type="cat")


def test_dora_trains_its_magnitude_and_delete_removes_it():
    model = get_peft_model(make("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    layer = layers(model)["transformer.h.0.attn.c_attn"]
    m = layer.lora_magnitude_vector["default"].weight
    assert m.requires_grad and m.shape == (layer.out_features,)
    inputs = batch("gpt2")
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert m.grad is not None and m.grad.abs().max() > 0
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
    model.delete_adapter("default")
    assert "default" not in layer.lora_magnitude_vector
