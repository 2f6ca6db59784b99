"""Pruning after fine-tuning: exact patterns, the sparsity asked for, Wanda's scores, the report,
and the bad requests refused."""

import pytest
import torch
import torch.nn as nn

from conftest import make
import minilora
from minilora.pruning import is_two_four, keep_mask, prunable_layers, weight_view


def calibration_batches(n=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (2, 12), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_keeps_exactly_two_of_every_four_inputs(family, method):
    model = make(family)
    report = minilora.prune(model, sparsity=0.5, method=method, pattern="2:4", calibration=calibration_batches())
    layers = prunable_layers(model)
    assert len(report.layers) == len(layers) > 0
    for name, layer in layers.items():
        W = weight_view(layer)  # (d_out, d_in): GPT-2's Conv1D transposed
        groups = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)
        assert torch.equal(groups, torch.full_like(groups, 2)), name
    assert report.sparsity_reached == pytest.approx(0.5)
    assert all(layer.sparsity == pytest.approx(0.5) for layer in report.layers)


def test_two_four_layout_is_the_semi_structured_one():
    """The kept pair of each group are the two largest scores, laid along the input dim of a (d_out, d_in) weight."""
    S = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    mask = keep_mask(S, 0.5, "2:4", per_row=False)
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]
    assert is_two_four(S * mask) and not is_two_four(S)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_reaches_the_sparsity(scope, method):
    model = make("llama")
    report = minilora.prune(model, sparsity=0.5, method=method, scope=scope, calibration=calibration_batches())
    zeros = sum(int((weight_view(m) == 0).sum()) for m in prunable_layers(model).values())
    total = sum(weight_view(m).numel() for m in prunable_layers(model).values())
    assert zeros / total == pytest.approx(0.5, abs=2e-3)
    assert report.sparsity_reached == pytest.approx(zeros / total)
    if scope == "layer":  # each layer on its own reaches the target
        assert all(layer.sparsity == pytest.approx(0.5, abs=0.02) for layer in report.layers)


def test_global_scope_spares_the_layer_with_large_weights():
    model = make("llama")
    big = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        big.weight.mul_(100)
    report = minilora.prune(model, sparsity=0.5, scope="global")
    per_layer = {layer.name: layer.sparsity for layer in report.layers}
    assert per_layer["model.layers.0.mlp.down_proj"] < 0.01
    assert max(per_layer.values()) > 0.5


def test_magnitude_drops_the_smallest_weights():
    model = make("llama")
    layer = model.model.layers[1].self_attn.q_proj
    before = layer.weight.detach().clone()
    minilora.prune(model, sparsity=0.25)
    kept = layer.weight != 0
    assert before[~kept].abs().max() <= before[kept].abs().min()
    assert torch.equal(layer.weight[kept], before[kept])  # survivors untouched


def test_wanda_weighs_by_input_norm():
    """Wanda per output row: |W_ij|·‖X_j‖. An input feature that never fires loses its weights first."""
    layer = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 25.0).reshape(3, 8))
    x = torch.randn(50, 8)
    x[:, -2:] = 0  # the two largest-weight inputs never fire
    x[:, 0] *= 1000  # the smallest-weight input is loud
    wrapper = nn.Sequential(layer)
    report = minilora.prune(wrapper, sparsity=0.25, method="wanda", calibration=[x])
    W = layer.weight
    assert (W[:, -2:] == 0).all() and (W[:, 0] != 0).all()
    assert ((W == 0).sum(dim=1) == 2).all()  # per row: ⌊0.25·8⌋ dropped
    assert report.layers[0].output_change == pytest.approx(0.0, abs=1e-6)  # silent inputs: output unchanged


def test_report_output_change_is_relative_error_on_calibration():
    layer = nn.Linear(16, 4, bias=False)
    wrapper = nn.Sequential(layer)
    x = torch.randn(40, 16)
    W = layer.weight.detach().clone()
    report = minilora.prune(wrapper, sparsity=0.5, calibration=[x])
    expected = (x @ (W - layer.weight.detach()).t()).norm() / (x @ W.t()).norm()
    assert report.layers[0].output_change == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < report.layers[0].output_change < 1
    assert "| 0 | 4×16 | 0.500 |" in report.table()
    assert '"output_change"' in report.to_json()


def test_zero_sparsity_changes_nothing():
    model = make("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = minilora.prune(model, sparsity=0.0, calibration=calibration_batches(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(layer.output_change == 0 for layer in report.layers)


def test_bad_requests_are_refused():
    model = make("llama")
    for bad in (1.0, -0.1, 1.5, "half"):
        with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
            minilora.prune(model, sparsity=bad)
    with pytest.raises(ValueError, match="exactly sparsity 0.5"):
        minilora.prune(model, sparsity=0.3, pattern="2:4")
    with pytest.raises(ValueError, match="calibration="):
        minilora.prune(model, sparsity=0.5, method="wanda")
    with pytest.raises(ValueError, match="method must be one of"):
        minilora.prune(model, sparsity=0.5, method="random")
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"divisible by 4; 0 has weight shape \(d_out, d_in\) = \(4, 6\)"):
        minilora.prune(odd, sparsity=0.5, pattern="2:4")
    with_lora = minilora.get_peft_model(make("llama"), minilora.LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        minilora.prune(with_lora, sparsity=0.5)
