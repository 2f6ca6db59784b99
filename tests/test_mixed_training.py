"""Mixed batches in training: each row's loss reaches its own adapter and nothing else, with the
gradients of running each adapter's rows on their own; DoRA and lora_bias exact, QLoRA, dropout,
gradient checkpointing and torch.compile(fullgraph=True)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make
from minilora import LoraConfig, get_peft_model
from minilora.quant import quantize_model

ROWS = ["a", "b", "__base__", "c", "a", "b"]


def three_adapters(family="llama", base=None, **options):
    """Adapters a, b, c with different ranks and targets, B ≠ 0, in train mode."""
    targets = {"llama": (["q_proj", "v_proj"], ["v_proj", "o_proj"], ["q_proj", "down_proj"]),
               "gpt2": (["c_attn"], ["c_proj"], ["c_attn", "c_fc"])}[family]
    torch.manual_seed(0)
    model = get_peft_model(base if base is not None else make(family), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets[0], init_lora_weights=False, lora_dropout=0.0, **options))
    model.add_adapter("a", copy.deepcopy(model.peft_config["default"]))
    model.delete_adapter("default")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=targets[1], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=8, lora_alpha=8, target_modules=targets[2], init_lora_weights=False,
                                      use_rslora=True))
    model.set_requires_grad(["a", "b", "c"], True)
    return model.train()


def row_losses(logits, ids):
    """Σ over each row's next-token losses, (B,)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


def ids_for(rows, length=9, seed=1):
    return torch.randint(3, 128, (len(rows), length), generator=torch.Generator().manual_seed(seed))


def adapter_grads(model, names=("a", "b", "c")) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if any(f".{a}." in n or n.endswith(f".{a}") for a in names) and p.grad is not None}


def mixed_gradients(model, ids, rows=ROWS, call=None):
    model.zero_grad(set_to_none=True)
    call = model if call is None else call
    row_losses(call(input_ids=ids, adapter_names=rows).logits, ids).sum().backward()
    return adapter_grads(model)


def separate_gradients(model, ids, rows=ROWS):
    """Each adapter's rows in a call of their own, with that adapter alone acting."""
    model.zero_grad(set_to_none=True)
    for name in dict.fromkeys(r for r in rows if r != "__base__"):
        idx = torch.tensor([i for i, r in enumerate(rows) if r == name])
        with model.adapters_acting([name]):
            row_losses(model(input_ids=ids[idx]).logits, ids[idx]).sum().backward()
    return adapter_grads(model)


def assert_same(got: dict, want: dict, tol=1e-5):
    """Each gradient equal to `tol` relative, as a whole (‖got − want‖ ≤ tol · ‖want‖)."""
    assert got.keys() == want.keys() and len(got) > 0
    for name in got:
        assert (got[name] - want[name]).norm() <= tol * want[name].norm(), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_training_gradients_equal_each_adapter_on_its_own_rows(family):
    model = three_adapters(family)
    ids = ids_for(ROWS)
    assert_same(mixed_gradients(model, ids), separate_gradients(model, ids))


def test_a_row_changes_no_other_adapter():
    model = three_adapters()
    ids = ids_for(ROWS)
    logits = model(input_ids=ids, adapter_names=ROWS).logits
    row_losses(logits, ids)[0].backward()  # row 0 is adapter a's
    grads = adapter_grads(model)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".a." in n)
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if ".a." not in n)  # b, c: exactly zero
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".b." in n or ".c." in n}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0).step()
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_bias": True}])
def test_variants_run_exactly_in_mixed_batches(variant):
    model = three_adapters("gpt2", **variant)  # adapter a carries the variant
    ids = ids_for(ROWS)
    assert_same(mixed_gradients(model, ids), separate_gradients(model, ids))
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=ROWS).logits
        for i, name in enumerate(ROWS):
            with model.adapters_acting([] if name == "__base__" else [name]):
                torch.testing.assert_close(mixed[i:i + 1], model(input_ids=ids[i:i + 1]).logits, rtol=1e-5, atol=1e-6)


def test_qlora_base():
    base = make("llama")
    quantize_model(base)
    model = three_adapters("llama", base=base)
    ids = ids_for(ROWS)
    assert_same(mixed_gradients(model, ids), separate_gradients(model, ids))


def test_dropout_acts_per_adapter_and_stays_in_its_rows():
    model = three_adapters()
    for layer in (m for m in model.modules() if hasattr(m, "lora_dropout") and "a" in m.lora_dropout):
        layer.lora_dropout["a"] = torch.nn.Dropout(0.5)
    ids = ids_for(ROWS)
    rows_of_a = [i for i, r in enumerate(ROWS) if r == "a"]
    with torch.no_grad():
        trained = model(input_ids=ids, adapter_names=ROWS).logits
        evaluated = model.eval()(input_ids=ids, adapter_names=ROWS).logits
    others = [i for i in range(len(ROWS)) if i not in rows_of_a]
    assert not torch.allclose(trained[rows_of_a], evaluated[rows_of_a])  # a's dropout acted on a's rows
    torch.testing.assert_close(trained[others], evaluated[others])  # and on no other row


def test_gradient_checkpointing_keeps_each_rows_adapter():
    model = three_adapters()
    ids = ids_for(ROWS)
    plain = mixed_gradients(model, ids)
    model.gradient_checkpointing_enable()
    assert_same(mixed_gradients(model, ids), plain)


def test_checkpointing_that_cannot_keep_the_adapters_is_refused():
    model = three_adapters()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = ids_for(ROWS)
    with pytest.raises(ValueError, match="through the LoraModel"):
        model(input_ids=ids, adapter_names=ROWS)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True cannot keep them"):
        model(input_ids=ids, adapter_names=ROWS)
    model.eval()  # inference recomputes nothing: allowed
    with torch.no_grad():
        model(input_ids=ids, adapter_names=ROWS)


def test_compiled_fullgraph_training_matches_eager():
    model = three_adapters("gpt2", base=make("gpt2", n_layer=1))  # dynamo traces each layer alike
    ids = ids_for(ROWS)
    eager = mixed_gradients(model, ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same(mixed_gradients(model, ids, call=compiled), eager)
