"""TIES, DARE and magnitude-prune merges: PEFT's weights for the deterministic ones (the same case
run through PEFT), DARE by its statistics, the bad requests refused."""

import copy

import peft
import pytest
import torch

from conftest import make
import minilora
from minilora.merge_methods import MergeOptions, magnitude_keep, merge_tensors, random_keep
from minilora.roles import FULL

TARGETS = ["q_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def built_pair(tmp_path_factory):
    return peft_pair(tmp_path_factory.mktemp("adapters"))


@pytest.fixture
def pair(built_pair):
    """A fresh copy of (PEFT's model, minilora's model) for each test."""
    return copy.deepcopy(built_pair)


def peft_pair(tmp_path):
    """A PEFT model with adapters "first" and "second" (random B, different alphas), and minilora's copy of it."""
    torch.manual_seed(0)
    base = make("llama", seed=0)
    first = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(base, first, adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    mm = minilora.LoraModel.from_pretrained(make("llama", seed=0), tmp_path / "first" if (tmp_path / "first").exists()
                                            else tmp_path, adapter_name="first")
    mm.load_adapter(tmp_path / "second", adapter_name="second")
    return pm, mm


def layer_pairs(pm, mm, name):
    """(path, PEFT's (A, B), minilora's (A, B)) of adapter `name` on each layer that has it."""
    out = []
    for path, module in mm.model.named_modules():
        if isinstance(module, minilora.LoraLinear) and name in module.lora_A:
            theirs = pm.base_model.model.get_submodule(path)
            out.append((path, (theirs.lora_A[name].weight, theirs.lora_B[name].weight),
                        (module.lora_A[name].weight, module.lora_B[name].weight)))
    return out


POSITIVE, MIXED = [0.7, 0.4], [1.0, -0.6]  # PEFT allows negative weights: the sign goes into A


@pytest.mark.parametrize("method, sign_method, weights", [
    ("ties", "total", MIXED), ("ties", "frequency", POSITIVE), ("ties_svd", "total", MIXED),
    ("ties_svd", "frequency", POSITIVE), ("magnitude_prune", "total", MIXED), ("magnitude_prune_svd", "total", POSITIVE),
    ("magnitude_prune", "total", POSITIVE), ("magnitude_prune_svd", "total", MIXED),
], ids=lambda value: {id(POSITIVE): "positive", id(MIXED): "mixed"}.get(id(value), str(value)))
def test_deterministic_methods_give_peft_weights(pair, method, weights, sign_method):
    pm, mm = pair
    kwargs = dict(combination_type=method, density=0.3, majority_sign_method=sign_method)
    pm.add_weighted_adapter(["first", "second"], weights, "mix", **kwargs)
    mm.add_weighted_adapter(["first", "second"], weights, "mix", **kwargs)
    pairs = layer_pairs(pm, mm, "mix")
    assert len(pairs) == 4 * len(TARGETS)  # o_proj has only "first": PEFT still merges it alone
    for path, (peft_A, peft_B), (A, B) in pairs:
        if method.endswith("svd"):  # singular vectors are defined up to sign: compare the update
            torch.testing.assert_close(B @ A, peft_B @ peft_A, atol=1e-5, rtol=1e-4, msg=path)
        else:
            torch.testing.assert_close(A, peft_A, atol=1e-6, rtol=1e-5, msg=path)
            torch.testing.assert_close(B, peft_B, atol=1e-6, rtol=1e-5, msg=path)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    pm.set_adapter("mix")
    mm.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(mm(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_dare_on_adapter_factors_keeps_density_and_rescales(pair):
    """With the second adapter weighted 0, the merged A is DARE of the first alone: each entry is 0 or
    sign(c)·√|c| · A₁ / density, and about `density` of them survive."""
    _, mm = pair
    mm.add_weighted_adapter(["first", "second"], [0.8, 0.0], "mix", combination_type="dare_linear", density=0.4,
                            seed=2)
    layer = mm.model.model.layers[1].self_attn.q_proj
    A, A1 = layer.lora_A["mix"].weight, layer.lora_A["first"].weight
    c = 0.8 * layer.scaling["first"]
    kept = A != 0
    torch.testing.assert_close(A[kept], (c ** 0.5) * A1[kept] / 0.4)
    total = kept.numel() * 4 * 2  # all q_proj/v_proj layers' A, checked together below
    survivors = sum((m.lora_A["mix"].weight != 0).sum().item() for m in mm.model.modules()
                    if isinstance(m, minilora.LoraLinear) and "mix" in m.lora_A and "second" in m.lora_A)
    assert abs(survivors / total - 0.4) < 4 * (0.4 * 0.6 / total) ** 0.5


def test_one_adapter_is_linear_as_in_peft(pair):
    pm, mm = pair
    mm.add_weighted_adapter(["first"], [0.5], "ties_one", combination_type="ties", density=0.1)
    mm.add_weighted_adapter(["first"], [0.5], "linear_one", combination_type="linear")
    for module in mm.model.modules():
        if isinstance(module, minilora.LoraLinear) and "ties_one" in module.lora_A:
            assert torch.equal(module.delta_weight("ties_one", FULL), module.delta_weight("linear_one", FULL))


def test_seeded_dare_keeps_density_and_rescales():
    t = torch.randn(200, 300)
    options = MergeOptions(density=0.3, seed=5)
    kept = random_keep(t, 0.3, options.generator)
    survivors = kept != 0
    fraction = survivors.float().mean().item()
    assert abs(fraction - 0.3) < 4 * (0.3 * 0.7 / t.numel()) ** 0.5  # within 4 standard deviations
    torch.testing.assert_close(kept[survivors], t[survivors] / 0.3)  # survivors scaled by 1/density
    again = random_keep(t, 0.3, MergeOptions(density=0.3, seed=5).generator)
    assert torch.equal(kept, again)  # a seed reproduces the masks
    other = random_keep(t, 0.3, MergeOptions(density=0.3, seed=6).generator)
    assert not torch.equal(kept, other)
    # unbiased: averaged over many draws, DARE's merge approaches the linear one
    g = MergeOptions(density=0.5, seed=1)
    x, y = torch.randn(64), torch.randn(64)
    mean = sum(merge_tensors([x, y], [0.6, 0.4], "dare_linear", g) for _ in range(4000)) / 4000
    torch.testing.assert_close(mean, 0.6 * x + 0.4 * y, atol=0.06, rtol=0)


def test_seeded_dare_adapter_is_reproducible(pair):
    _, mm = pair
    for name in ("one", "two"):
        mm.add_weighted_adapter(["first", "second"], [0.5, 0.5], name, combination_type="dare_ties", density=0.4, seed=9)
    mm.add_weighted_adapter(["first", "second"], [0.5, 0.5], "three", combination_type="dare_ties", density=0.4, seed=10)
    layer = mm.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.delta_weight("one", FULL), layer.delta_weight("two", FULL))
    assert not torch.equal(layer.delta_weight("one", FULL), layer.delta_weight("three", FULL))


def test_ties_by_hand():
    """τ₁ = [3, −2, 0.5, 1], τ₂ = [−1, −4, 2, 0.1], density 0.5 keeps [3, −2, 0, 0] and [0, −4, 2, 0]."""
    t1, t2 = torch.tensor([3.0, -2.0, 0.5, 1.0]), torch.tensor([-1.0, -4.0, 2.0, 0.1])
    assert torch.equal(magnitude_keep(t1, 0.5), torch.tensor([3.0, -2.0, 0.0, 0.0]))
    merged = merge_tensors([t1, t2], [1.0, 0.5], "ties", MergeOptions(density=0.5))
    # signs: [3 → +], [−6 → −], [2 → +], [0 → + , nobody agrees]; agreeing entries averaged after weighting
    torch.testing.assert_close(merged, torch.tensor([3.0, (-2.0 - 2.0) / 2, 1.0, 0.0]))


def test_bad_merge_requests_are_refused(pair):
    _, mm = pair
    with pytest.raises(ValueError, match=r"needs density= in \(0, 1\]"):
        mm.add_weighted_adapter(["first", "second"], [0.5, 0.5], "x", combination_type="ties")
    with pytest.raises(ValueError, match=r"needs density= in \(0, 1\].*got 1.5"):
        mm.add_weighted_adapter(["first", "second"], [0.5, 0.5], "x", combination_type="dare_linear", density=1.5)
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        mm.add_weighted_adapter(["first", "second"], [0.5, 0.5], "x", combination_type="ties", density=0.5,
                                majority_sign_method="vote")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        mm.add_weighted_adapter(["first", "second"], [0.5, 0.5], "x", combination_type="tie", density=0.5)
    mm.add_adapter("wide", minilora.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="needs adapters of one rank, got ranks \\[4, 8\\]"):
        mm.add_weighted_adapter(["first", "wide"], [0.5, 0.5], "x", combination_type="ties", density=0.5)
    mm.add_weighted_adapter(["first", "wide"], [0.5, 0.5], "ok", combination_type="ties_svd", density=0.5)
    assert "ok" in mm.peft_config
