"""LoRA on nn.Conv1d / nn.Conv2d (conv.py, one layer kind in one file) against PEFT's Conv layers:
names, shapes, outputs, gradients, merges, state dicts and files, both ways."""

import copy
import warnings

import peft
import pytest
import torch
import torch.nn as nn

import minilora


class ConvNet(nn.Module):
    """Two Conv2d (one strided), a Conv1d over the flattened map and a Linear head: (b, 3, 9, 9) -> (b, 4)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.c1d = nn.Conv1d(8, 6, 2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))  # (b, 8, 4, 4)
        h = self.c1d(h.flatten(2))  # (b, 6, 15)
        return self.head(h.mean(-1))


TARGETS = ["conv1", "conv2", "c1d", "head"]
X = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def both(**extra):
    torch.manual_seed(0)
    base = ConvNet()
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, **extra)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs))
    return base, theirs, ours


def test_same_parameters_outputs_and_gradients_as_peft():
    base, theirs, ours = both()
    shapes = lambda m: {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert not any(ours.load_state_dict(theirs.state_dict(), strict=True))
    assert (theirs(X) - base(X)).abs().max() > 1e-2
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)
    for model in (ours, theirs):
        model(X).pow(2).mean().backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, their_grads[name], atol=1e-5, rtol=1e-4)
    layer, peer = ours.model.conv2, theirs.base_model.model.conv2
    assert (layer.r, layer.lora_alpha, layer.scaling) == (peer.r, peer.lora_alpha, peer.scaling)
    torch.testing.assert_close(layer.get_delta_weight("default"), peer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_a_fresh_adapter_changes_nothing_and_all_linear_leaves_convolutions_alone():
    torch.manual_seed(0)
    base = ConvNet()
    model = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(target_modules=TARGETS))
    assert torch.equal(model(X), base(X))
    linear_only = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(target_modules="all-linear"))
    assert linear_only.targeted_module_names == ["head"]  # Linear layers only


def test_state_dicts_and_files_cross_both_ways(tmp_path):
    base, theirs, ours = both()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert not any(theirs.load_state_dict(ours.state_dict(), strict=True))
    torch.testing.assert_close(theirs(X), ours(X), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(X), ours(X),
                               atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(minilora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")(X), ours(X),
                               atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_unload_match_peft():
    base, theirs, ours = both()
    ours.load_state_dict(theirs.state_dict())
    expected = theirs(X)
    weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    for name, p in ours.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.conv1) is nn.Conv2d and type(merged.c1d) is nn.Conv1d
    torch.testing.assert_close(merged(X), theirs.merge_and_unload()(X), atol=1e-5, rtol=1e-5)


def test_several_adapters_per_row_and_weighted():
    _, _, ours = both()
    ours.add_adapter("other", minilora.LoraConfig(r=2, target_modules=["conv1"], init_lora_weights=False))
    ours.eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.1)
    rows = ours(X, adapter_names=["default", "other"])
    for i, name in enumerate(["default", "other"]):
        ours.set_adapter(name)
        torch.testing.assert_close(rows[i], ours(X[i:i + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv, message", [
    (nn.Conv2d(3, 4, 3, dilation=2), "dilation"), (nn.Conv2d(4, 4, 3, groups=2), "groups"),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "padding_mode")])
def test_convolutions_lora_cannot_cover_are_refused_by_name(conv, message):
    model = nn.Sequential(conv)
    with pytest.raises(ValueError, match=message):
        minilora.get_peft_model(model, minilora.LoraConfig(target_modules=["0"]))


def test_options_convolutions_do_not_take_are_refused():
    for option in (dict(use_dora=True), dict(lora_bias=True)):
        with warnings.catch_warnings(), pytest.raises(ValueError, match="convolution"):
            warnings.simplefilter("ignore")
            minilora.get_peft_model(ConvNet(), minilora.LoraConfig(target_modules=["conv1"], **option))
