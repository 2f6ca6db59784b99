"""Many adapters on one base: mixed batches, weighted mixing, weighted combinations, tag routing."""

import pytest
import torch

from conftest import make
from minilora import LoraConfig, get_peft_model
from minilora.routing import TagRouter


def two_adapters(family="llama"):
    pm = get_peft_model(make(family), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=["v", "o"], init_lora_weights=False))
    return pm.eval()


def alone(pm, name, ids):
    """The logits of `ids` with only adapter `name` (or the base) active."""
    if name == "__base__":
        with pm.disable_adapter():
            return pm(input_ids=ids).logits
    pm.set_adapter(name)
    return pm(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["gather", "segments"])
def test_mixed_batch_rows_equal_single_adapter_runs(family, method):
    pm = two_adapters(family)
    pm.mixed_batch_method = method
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = pm(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i:i + 1], alone(pm, name, ids[i:i + 1]), atol=1e-5, rtol=1e-5)


def test_mixed_batch_through_generate():
    pm = two_adapters()
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["default", "b", "__base__"]
    out = pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                one = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        else:
            pm.set_adapter(name)
            one = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i:i + 1], one)


def test_weighted_mixing_per_request():
    pm = two_adapters()
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, adapter_weights={"b": 1.0}).logits, alone(pm, "b", ids))
        torch.testing.assert_close(pm(input_ids=ids, adapter_weights={"b": 0.0}).logits, alone(pm, "__base__", ids))
        q = pm.model.model.layers[0].self_attn.v_proj  # both adapters act here: the paths add, weighted
        x = torch.randn(3, 32)
        with pm.disable_adapter():
            base = q(x)
        from minilora.mixing import Routing

        with pm.routed(Routing(weights={"default": 0.7, "b": 0.3})):
            mixed = q(x)
        pm.set_adapter("default")
        d = q(x) - base
        pm.set_adapter("b")
        b = q(x) - base
    torch.testing.assert_close(mixed - base, 0.7 * d + 0.3 * b, atol=1e-6, rtol=1e-5)


def test_bad_adapter_choices_are_refused():
    pm = two_adapters()
    ids = torch.randint(3, 128, (2, 5))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; loaded adapters: \['b', 'default'\]"):
        pm(input_ids=ids, adapter_names=["nope", "b"])
    with pytest.raises(ValueError, match="has 3 entries but the batch has 2 rows"):
        pm(input_ids=ids, adapter_names=["b", "b", "b"])
    with pytest.raises(ValueError, match="not both"):
        pm(input_ids=ids, adapter_names=["b", "b"], adapter_weights={"b": 1.0})
    pm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        pm(input_ids=ids, adapter_names=["b", "b"])


def delta(layer, name, part):
    return layer.delta_weight(name, part) if name in layer.parts and part in layer.parts[name] else 0


def test_cat_is_exact_and_svd_error_is_the_discarded_singular_values():
    pm = two_adapters("gpt2")
    c_attn = pm.model.transformer.h[0].attn.c_attn
    target_v = 0.7 * delta(c_attn, "default", "v") + 0.3 * delta(c_attn, "b", "v")
    pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "cat", combination_type="cat")
    torch.testing.assert_close(delta(c_attn, "cat", "v"), target_v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta(c_attn, "cat", "q"), 0.7 * delta(c_attn, "default", "q"), atol=1e-6, rtol=1e-5)
    assert c_attn.parts["cat"]["v"].r == 4 + 2

    energy = pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "svd", combination_type="svd", svd_rank=3)
    S = torch.linalg.svdvals(target_v)
    error = (delta(c_attn, "svd", "v") - target_v).norm()
    torch.testing.assert_close(error, S[3:].square().sum().sqrt(), atol=1e-5, rtol=1e-4)
    assert energy["transformer.h.0.attn.c_attn:v"] == pytest.approx((S[:3].square().sum() / S.square().sum()).item(), rel=1e-5)


def test_linear_is_the_documented_approximation_and_needs_one_rank():
    pm = get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=4, lora_alpha=4, target_modules=["q"], init_lora_weights=False))
    pm.add_weighted_adapter(["default", "b"], [0.6, 0.4], "lin", combination_type="linear")
    q = pm.model.model.layers[0].self_attn.q_proj
    A = [q.lora_A[n].weight for n in ("default", "b")]
    B = [q.lora_B[n].weight for n in ("default", "b")]
    s = [q.scaling[n] for n in ("default", "b")]
    w = [0.6, 0.4]  # PEFT's formula: c = w·s; B = Σ √|c| B_i, A = Σ sign(c) √|c| A_i
    c = [w_i * s_i for w_i, s_i in zip(w, s)]
    expected = sum(c_i ** 0.5 * B_i for c_i, B_i in zip(c, B)) @ sum(c_i ** 0.5 * A_i for c_i, A_i in zip(c, A))
    torch.testing.assert_close(q.delta_weight("lin", "full"), expected, atol=1e-6, rtol=1e-5)
    pm.add_adapter("c", LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match="needs adapters of one rank.*use 'cat'"):
        pm.add_weighted_adapter(["default", "c"], [0.5, 0.5], "bad", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        pm.add_weighted_adapter(["default", "c"], [0.5], "bad", combination_type="cat")


def test_a_combination_keeps_the_head_that_one_adapter_trained():
    pm = get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q"], modules_to_save=["lm_head"]))
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["q"]))
    heads = pm.model.lm_head.modules_to_save
    with torch.no_grad():
        heads["default"].weight.add_(1.0)  # as if trained
    pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    assert torch.equal(heads["mix"].weight, heads["default"].weight)  # PEFT's copy would be the untrained head
    assert not heads["mix"].weight.requires_grad  # a combination is for inference
    pm.add_adapter("c", LoraConfig(r=4, target_modules=["q"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="same module with modules_to_save"):
        pm.add_weighted_adapter(["default", "c"], [0.5, 0.5], "clash", combination_type="cat")


def test_prompt_tags_route_with_fallback_and_warnings():
    router = TagRouter(adapters=["finance", "medical"])
    with pytest.warns(UserWarning, match="unknown tag 'legal'"):
        names, texts = router.route(["<domain=medical> What is a fever?", "<domain=legal> Sue?", "plain"])
    assert names == ["medical", "__base__", "__base__"]
    assert texts == ["What is a fever?", "Sue?", "plain"]
    keep = TagRouter(adapters=["finance"], strip=False, default="finance")
    with pytest.warns(UserWarning, match="no tag"):
        assert keep.route(["<domain=finance> x", "y"]) == (["finance", "finance"], ["<domain=finance> x", "y"])
    with pytest.raises(ValueError, match="group named 'name'"):
        TagRouter(adapters=["a"], pattern=r"<(\w+)>")


DOMAINS = {
    "finance": ["Quarterly revenue rose {n}% as the bank cut costs", "The fund sold {n} million in bonds and shares"],
    "medical": ["The patient had a fever of {n} degrees and a cough", "Take {n} mg of the drug twice a day after meals"],
    "legal": ["The court ruled that clause {n} of the contract was void", "The tenant may appeal within {n} days of notice"],
    "general": ["We walked {n} miles to the lake on a sunny day", "My cat sleeps {n} hours by the warm window"],
}


def domain_data(n_per_domain, seed):
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for label, (name, templates) in enumerate(DOMAINS.items()):
        for _ in range(n_per_domain):
            texts.append(rng.choice(templates).format(n=rng.randint(1, 99)))
            labels.append(label)
    ids = torch.tensor([[min(b, 127) for b in t.encode()[:32].ljust(32, b" ")] for t in texts])  # (N, 32) bytes
    return texts, ids, torch.tensor(labels)


def four_adapters():
    pm = get_peft_model(make("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False),
                        adapter_name="finance")
    for name in ("medical", "legal", "general"):
        pm.add_adapter(name, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    return pm.eval()


def test_learned_router_routes_held_out_domains_and_mixes_in_one_pass():
    from minilora.routing import LoraRouter

    pm = four_adapters()
    _, train_ids, train_labels = domain_data(40, seed=0)
    _, test_ids, test_labels = domain_data(25, seed=1)
    torch.manual_seed(0)
    router = LoraRouter(pm, list(DOMAINS))
    router.fit(pm, train_ids, train_labels, steps=300)
    assert router.accuracy(pm, test_ids, test_labels) >= 0.95

    with torch.no_grad():  # a router sure of "legal" computes exactly adapter "legal"
        router.proj.weight.zero_()
        router.proj.bias.copy_(torch.tensor([-30.0, -30.0, 30.0, -30.0]))
        routed_logits = router(pm, test_ids[:3]).logits
        pm.set_adapter("legal")
        torch.testing.assert_close(routed_logits, pm(input_ids=test_ids[:3]).logits, atol=1e-5, rtol=1e-5)
    top1 = LoraRouter(pm, list(DOMAINS), top_k=1)
    assert bool(((top1.weights(torch.randn(5, 4)) > 0).sum(-1) == 1).all())
    per_token = LoraRouter(pm, list(DOMAINS), per_token=True)
    assert per_token.logits(torch.randn(2, 7, 32), None).shape == (2, 7, 4)


def test_cascade_classifies_then_generates_with_the_chosen_adapters():
    from minilora.routing import Cascade, TextClassifier

    pm = four_adapters()
    texts, _, labels = domain_data(30, seed=2)
    classifier = TextClassifier(list(DOMAINS))
    assert classifier.fit(texts, [list(DOMAINS)[i] for i in labels]) == 1.0
    queries = ["The patient took 5 mg of the drug", "The court ruled the clause void", "Revenue rose 3% at the bank"]

    def encode(batch):
        return {"input_ids": torch.tensor([[min(b, 127) for b in t.encode()[:16].ljust(16, b" ")] for t in batch])}

    names, out = Cascade(classifier).generate(pm, queries, encode, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert names == ["medical", "legal", "finance"]
    for i, name in enumerate(names):
        pm.set_adapter(name)
        alone_out = pm.generate(**encode(queries[i:i + 1]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i:i + 1], alone_out)


def test_training_one_adapter_never_changes_another():
    pm = two_adapters()
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if ".b." in n}
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        b_out = alone(pm, "b", ids)
    pm.set_adapter("default")
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters() if ".b." in n)
    with torch.no_grad():
        assert torch.equal(alone(pm, "b", ids), b_out)


def adapter_parameters(pm, name):
    return [p for path, p in pm.named_parameters() if f".{name}." in path]


def test_set_adapter_touches_only_the_adapters_that_change():
    pm = two_adapters()
    for i in range(20):
        pm.add_adapter(f"extra{i}", LoraConfig(r=2, target_modules=["q"]))
    touched = []
    original = torch.nn.Parameter.requires_grad_

    def spy(self, flag=True):
        touched.append(self)
        return original(self, flag)

    torch.nn.Parameter.requires_grad_ = spy
    try:
        pm.set_adapter("b")
    finally:
        torch.nn.Parameter.requires_grad_ = original
    assert len(touched) == len(adapter_parameters(pm, "default")) + len(adapter_parameters(pm, "b"))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {n for n, _ in pm.named_parameters() if ".b." in n}


def test_mixed_batch_sees_a_replaced_adapter_and_changed_weights():
    pm = two_adapters()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        pm(input_ids=ids, adapter_names=["b", "default"])  # fills the stack cache
        pm.delete_adapter("b")
        pm.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=["v", "o"], init_lora_weights=False))
        pm.eval()
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=["b", "b"]).logits, alone(pm, "b", ids))
        for p in adapter_parameters(pm, "b"):
            p.mul_(2.0)  # an in-place update, as an optimizer makes
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=["b", "b"]).logits, alone(pm, "b", ids))

