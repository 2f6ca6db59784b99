"""Compiled hotswap (hotswap.py): after prepare_model_for_compiled_hotswap, switching adapters,
replacing one from a file and mixed batches run in the graph compiled once, with the outputs of
the eager model that holds each adapter the plain way; what a graph cannot serve is refused."""

import copy
import warnings

import peft
import pytest
import torch
from peft.utils import hotswap as peft_hotswap

import minilora as ml
from minilora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

from conftest import tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj"]
RANKS = {"a0": 4, "a1": 8, "a2": 4, "a3": 16, "a4": 8}


def ids(rows=2):
    return torch.randint(0, 128, (rows, 8), generator=torch.Generator().manual_seed(0))


def config(r, library=ml, **options):
    return library.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=TARGETS, init_lora_weights=False, **options)


def with_adapters(ranks=RANKS, base=None):
    """A LLaMA with one adapter per entry of `ranks`, the first active, and each adapter's eager logits."""
    torch.manual_seed(0)
    names = list(ranks)
    model = ml.get_peft_model(base or tiny_llama(2), config(ranks[names[0]]), names[0])
    for name in names[1:]:
        model.add_adapter(name, config(ranks[name], use_rslora=name == "a4"))
    model.eval()
    logits = {}
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            logits[name] = model(input_ids=ids()).logits
    model.set_adapter(names[0])
    return model, logits


class Graphs:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        return gm.forward


def test_switching_adapters_runs_the_one_compiled_graph_with_each_adapter_s_outputs():
    model, eager = with_adapters()
    prepare_model_for_compiled_hotswap(model)
    graphs = Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with torch.no_grad():
        for _ in range(2):
            for name in reversed(RANKS):
                model.set_adapter(name)
                torch.testing.assert_close(compiled(input_ids=ids()).logits, eager[name], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(model(input_ids=ids()).logits, eager[name], rtol=1e-5, atol=1e-5)
    assert graphs.count == 1
    assert all(not p.requires_grad for p in model.parameters())  # a prepared model serves


def test_without_preparing_each_adapter_is_a_graph_of_its_own():
    """The cost the preparation removes, measured the same way."""
    model, _ = with_adapters({"a0": 4, "a1": 8, "a2": 4})
    graphs = Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with torch.no_grad():
        for name in ("a0", "a1", "a2"):
            model.set_adapter(name)
            compiled(input_ids=ids())
    assert graphs.count == 3


def test_a_hotswap_load_replaces_the_adapter_in_place_without_recompiling(tmp_path):
    source, eager = with_adapters()
    for name in RANKS:
        source.save_pretrained(tmp_path, selected_adapters=[name])
    model, _ = with_adapters({"a0": 4, "a1": 8})
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    graphs = Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with torch.no_grad():
        compiled(input_ids=ids())
        for name in ("a3", "a4", "a2", "a0"):  # ranks 16, 8 (rsLoRA), 4, 4: each into slot a0
            where = tmp_path / name  # save_pretrained puts an adapter not named "default" in its own folder
            if name == "a4":
                hotswap_adapter(compiled, str(where), "a0")  # PEFT's function, on the compiled model
            else:
                model.load_adapter(where, "a0", hotswap=True)
            assert model.active_adapter == "a0" and model.peft_config["a0"].r == RANKS[name]
            torch.testing.assert_close(compiled(input_ids=ids()).logits, eager[name], rtol=1e-5, atol=1e-5)
    assert graphs.count == 1


def test_a_file_that_does_not_fit_leaves_the_adapter_it_was_to_replace(tmp_path):
    source, eager = with_adapters({"a0": 4, "big": 12})
    source.save_pretrained(tmp_path, selected_adapters=["big"])
    model, _ = with_adapters({"a0": 4, "a1": 8})
    prepare_model_for_compiled_hotswap(model)  # target_rank 8
    with pytest.raises(ValueError, match="target_rank=12"):
        model.load_adapter(tmp_path / "big", "a0", hotswap=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, eager["a0"], rtol=1e-5, atol=1e-5)
    assert model.active_adapter == "a0" and model.peft_config["a0"].r == 4


def test_mixed_batches_are_one_graph_for_every_list_of_names():
    """GPT-2's sliced c_attn (q and v parts, K untouched) and "__base__" rows."""
    torch.manual_seed(0)
    model = ml.get_peft_model(tiny_gpt2(2), ml.LoraConfig(r=4, init_lora_weights=False), "a")
    model.add_adapter("b", ml.LoraConfig(r=8, lora_alpha=3, init_lora_weights=False))
    model.eval()
    x = ids(3)
    with torch.no_grad():
        eager = {n: model(input_ids=x, adapter_names=[n] * 3).logits for n in ("a", "b", "__base__")}
    prepare_model_for_compiled_hotswap(model)
    graphs = Graphs()
    model.compile(fullgraph=True, backend=graphs)  # the HF model inside: names become slots before the graph
    lists = [["a", "b", "__base__"], ["b", "b", "a"], ["__base__", "a", "b"]]
    with torch.no_grad():
        for rows in lists:
            out = model(input_ids=x, adapter_names=rows).logits
            for i, name in enumerate(rows):
                torch.testing.assert_close(out[i], eager[name][i], rtol=1e-5, atol=1e-5)
        model.set_adapter("b")
        torch.testing.assert_close(model(input_ids=x).logits, eager["b"], rtol=1e-5, atol=1e-5)
    assert graphs.count == 2  # one for mixed batches, one for the active adapter; no recompiles


def test_weights_changed_in_place_are_served_from_the_next_switch():
    model, eager = with_adapters({"a0": 4, "a1": 8})
    prepare_model_for_compiled_hotswap(model)
    with torch.no_grad():
        for A, B in model.base_model.model.model.layers[0].self_attn.q_proj.factors("a1").values():
            B.mul_(0)  # a1's q change on layer 0 is gone
        model.set_adapter("a1")
        changed = model(input_ids=ids()).logits
    assert not torch.allclose(changed, eager["a1"])
    plain, _ = with_adapters({"a0": 4, "a1": 8})
    with torch.no_grad():
        for A, B in plain.base_model.model.model.layers[0].self_attn.q_proj.factors("a1").values():
            B.mul_(0)
        plain.set_adapter("a1")
        torch.testing.assert_close(changed, plain(input_ids=ids()).logits, rtol=1e-5, atol=1e-5)


def test_a_deleted_adapter_frees_its_slot_for_the_next_without_recompiling():
    model, eager = with_adapters({"a0": 4, "a1": 8})
    prepare_model_for_compiled_hotswap(model)
    graphs = Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with torch.no_grad():
        compiled(input_ids=ids())
        model.delete_adapter("a1")
        with pytest.raises(ValueError, match="max_adapters"):
            model.add_adapter("x", config(4))
            model.add_adapter("y", config(4))
        model.set_adapter("x")
        assert not torch.allclose(compiled(input_ids=ids()).logits, eager["a0"])
        model.set_adapter("a0")
        torch.testing.assert_close(compiled(input_ids=ids()).logits, eager["a0"], rtol=1e-5, atol=1e-5)
    assert graphs.count == 1


@pytest.mark.parametrize("call, message", [
    (lambda m: m.add_adapter("big", config(32)), "target_rank=32"),
    (lambda m: m.add_adapter("k", ml.LoraConfig(r=4, target_modules=["k_proj"])), "outside the layers"),
    (lambda m: m.set_adapter(["a0", "a1"]), "one adapter per row"),
    (lambda m: m.merge_adapter(), "unmerged"),
    (lambda m: m.set_requires_grad("a0"), "does not train"),
    (lambda m: m(input_ids=ids(), adapter_weights={"a0": 1.0}), "add_weighted_adapter"),
])
def test_what_a_compiled_graph_cannot_serve_is_refused_with_what_to_do(call, message):
    model, _ = with_adapters({"a0": 4, "a1": 8})
    prepare_model_for_compiled_hotswap(model, max_adapters=4)
    with pytest.raises(ValueError, match=message):
        call(model)


def test_prepare_refuses_a_compiled_model_dora_and_a_second_call():
    model, _ = with_adapters({"a0": 4})
    with pytest.raises(ValueError, match="before compiling"):
        prepare_model_for_compiled_hotswap(torch.compile(model))
    model.add_adapter("d", config(4, use_dora=True))
    with pytest.raises(ValueError, match="does not serve"):
        prepare_model_for_compiled_hotswap(model)
    model.delete_adapter("d")
    prepare_model_for_compiled_hotswap(model)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model_for_compiled_hotswap(model)


def test_peft_s_own_hotswap_of_the_same_files_gives_the_same_outputs(tmp_path):
    """The peer: PEFT prepared and hotswapped from minilora's files, against minilora's hotswap."""
    source, eager = with_adapters({"a0": 4, "a3": 16})
    source.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = tiny_llama(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a0")).eval()
    peft_hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=16)
    ours = ml.PeftModel.from_pretrained(base, tmp_path / "a0").eval()
    prepare_model_for_compiled_hotswap(ours, target_rank=16)
    with torch.no_grad():
        peft_hotswap.hotswap_adapter(theirs, str(tmp_path / "a3"), "default")
        hotswap_adapter(ours, str(tmp_path / "a3"), "default")
        expected = theirs(input_ids=ids()).logits
        torch.testing.assert_close(expected, eager["a3"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)
