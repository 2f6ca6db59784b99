"""Slices of fused layers in the model's own layout: per head, per kv group, multi-query, GQA.

The proof that the rows minilora calls q are the queries comes from the model's own code, not from
minilora's table: an adapter on one part changes, in the first attention layer, the states the
model's attention code reads as that part, and leaves the others bit for bit (tests/zoo.py reads
them). Then: PEFT computes the same output from the saved files, files load both ways, merge
equals unmerged and touches only the part's rows.
"""

import pytest
import torch
import torch._dynamo as dynamo
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model as peft_get_peft_model
from safetensors.torch import load_file, save_file
from zoo import build, ids, output, probe_attention, probe_mlp

from minilora import LoraConfig, LoraModel, get_peft_model

FUSED_QKV = {  # case -> path of the first layer's fused q/k/v projection
    "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
    "bloom": "transformer.h.0.self_attention.query_key_value",
    "falcon_new": "transformer.h.0.self_attention.query_key_value",
    "falcon_mqa": "transformer.h.0.self_attention.query_key_value",
    "falcon_mha": "transformer.h.0.self_attention.query_key_value",
    "bigcode_mqa": "transformer.h.0.attn.c_attn",
    "bigcode_mha": "transformer.h.0.attn.c_attn",
    "phi3": "model.layers.0.self_attn.qkv_proj",
    "mpt": "transformer.blocks.0.attn.Wqkv",
    "modernbert": "layers.0.attn.Wqkv",
    "qwen3_5": "model.layers.0.linear_attn.in_proj_qkv",
}
FUSED_MODULE_NAME = {case: path.rsplit(".", 1)[-1] for case, path in FUSED_QKV.items()}
GATED_MLP = {  # case -> (fused gate/up path, activation module path, down projection path)
    "phi3": ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.activation_fn", "model.layers.0.mlp.down_proj"),
    "modernbert": ("layers.0.mlp.Wi", "layers.0.mlp.act", "layers.0.mlp.Wo"),
}


def adapted(case, targets, r=2, seed=0, dtype=None, **config):
    """A tiny `case` model with a random (B ≠ 0) adapter on `targets`."""
    torch.manual_seed(seed)
    return get_peft_model(build(case, dtype=dtype), LoraConfig(r=r, lora_alpha=4, target_modules=targets,
                                                  init_lora_weights=False, **config))


def at(model, path: str):
    """The module at `path` of the Hugging Face model inside `model`."""
    return model.get_base_model().get_submodule(path)


def changed(before: dict, after: dict) -> set:
    return {key for key in before if not torch.equal(before[key], after[key])}


@pytest.mark.parametrize("case", sorted(FUSED_QKV))
def test_an_adapter_on_one_part_changes_only_the_states_the_model_reads_as_that_part(case):
    pm = adapted(case, ["q"])
    for role in ("k", "v"):  # one adapter per part, each on that part alone
        pm.add_adapter(role, LoraConfig(r=2, lora_alpha=4, target_modules=[role], init_lora_weights=False))
    layer = at(pm, FUSED_QKV[case])
    assert {name: list(parts) for name, parts in layer.parts.items()} == {"default": ["q"], "k": ["k"], "v": ["v"]}
    x = ids()
    with pm.disable_adapter():
        base = probe_attention(case, pm, x)
    assert set(base) == {"q", "k", "v"}
    for adapter, role in (("default", "q"), ("k", "k"), ("v", "v")):
        pm.set_adapter(adapter)
        assert changed(base, probe_attention(case, pm, x)) == {role}, role


@pytest.mark.parametrize("role", ["gate", "up"])
@pytest.mark.parametrize("case", sorted(GATED_MLP))
def test_an_adapter_on_gate_or_up_changes_only_that_half_of_the_gated_mlp(case, role):
    fused, activation, down = GATED_MLP[case]
    pm = adapted(case, [role])
    assert list(at(pm, fused).parts["default"]) == [role]
    x = ids()
    modules = at(pm, activation), at(pm, down)
    with pm.disable_adapter():
        base = probe_mlp(pm, x, *modules)
    after = probe_mlp(pm, x, *modules)
    other = {"gate": "up", "up": "gate"}[role]
    torch.testing.assert_close(after[other], base[other], rtol=1e-12, atol=1e-12)  # up is read back by a division
    assert (after[role] - base[role]).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(FUSED_QKV))
def test_peft_loads_the_slices_and_computes_the_same_output(case, tmp_path):
    pm = adapted(case, ["q", "v", "up"])  # up: a half of Phi-3's gate_up_proj and ModernBERT's Wi
    x = ids()
    with torch.no_grad():
        expected = output(pm, x)
    pm.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(build(case), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(peft_model, x), expected, rtol=1e-10, atol=1e-10)
    again = LoraModel.from_pretrained(build(case), tmp_path)
    layer = at(again, FUSED_QKV[case])
    assert {name: part.blocks for name, part in layer.parts["default"].items()} == \
        {name: part.blocks for name, part in at(pm, FUSED_QKV[case]).parts["default"].items()}
    with torch.no_grad():
        torch.testing.assert_close(output(again, x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["gpt_neox", "falcon_new", "bigcode_mqa"])
def test_a_peft_adapter_on_the_whole_fused_layer_loads_in_minilora(case, tmp_path):
    torch.manual_seed(0)
    peft_model = peft_get_peft_model(build(case), PeftLoraConfig(r=2, lora_alpha=4, target_modules=[FUSED_MODULE_NAME[case]],
                                                                 init_lora_weights=False)).eval()
    x = ids()
    with torch.no_grad():
        expected = output(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    mine = LoraModel.from_pretrained(build(case), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(mine, x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["gpt_neox", "falcon_new", "bigcode_mha", "phi3"])
def test_a_whole_layer_file_with_k_rows_set_does_not_load_as_slices(case, tmp_path):
    pm = adapted(case, ["q", "v"])
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith(f"{FUSED_QKV[case]}.lora_B.weight"))
    k_rows = at(adapted(case, ["k"]), FUSED_QKV[case]).parts["default"]["k"]
    k_rows.rows(tensors[key], 0)[..., 0] = 1.0  # an entry where K's rows sit
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="non-zero entries outside the slices"):
        LoraModel.from_pretrained(build(case), tmp_path)


@pytest.mark.parametrize("case", sorted(FUSED_QKV))
def test_merge_equals_unmerged_and_touches_only_the_parts_rows(case):
    pm = adapted(case, ["q", "v"], dtype=torch.float32)  # merge computes in fp32
    layer = at(pm, FUSED_QKV[case])
    k = at(adapted(case, ["k"]), FUSED_QKV[case]).parts["default"]["k"]
    W = layer.base_layer.weight
    before = W.detach().clone()
    x = ids()
    with torch.no_grad():
        unmerged = output(pm, x)
        pm.merge_adapter()
        torch.testing.assert_close(output(pm, x), unmerged, rtol=1e-4, atol=1e-5)
    assert torch.equal(k.rows(W.detach(), 0), k.rows(before, 0))  # K's rows: bit for bit
    for name, part in layer.parts["default"].items():
        assert not torch.equal(part.rows(W.detach(), 0), part.rows(before, 0)), name
    pm.unmerge_adapter()
    torch.testing.assert_close(W.detach(), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["gpt_neox", "falcon_new"])
def test_mixed_batches_route_per_head_slices_per_row(case):
    pm = adapted(case, ["q", "v"])
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=3, target_modules=["v", "k"], init_lora_weights=False))
    pm.eval()
    x = ids(batch=3)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = pm(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    alone = pm(input_ids=x[i:i + 1]).logits
            else:
                pm.set_adapter(name)
                alone = pm(input_ids=x[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-9, atol=1e-9)


def test_training_per_head_slices_moves_only_their_factors():
    pm = adapted("gpt_neox", ["q", "v"], seed=1)
    pm.train()
    x = ids(batch=4, length=9)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(5):
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if not p.requires_grad)


def test_per_head_slices_trace_as_one_graph():
    torch.manual_seed(0)
    pm = get_peft_model(build("gpt_neox", dtype=torch.float32, num_hidden_layers=1),
                        LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
    dynamo.reset()
    explained = dynamo.explain(lambda x: pm(input_ids=x).logits)(ids())
    dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_dora_on_per_head_slices_saves_as_peft_whole_layer_dora(tmp_path):
    pm = adapted("gpt_neox", ["q", "v"], use_dora=True)
    x = ids()
    with torch.no_grad():
        expected = output(pm, x)
        pm.merge_adapter()  # computed in fp32
        torch.testing.assert_close(output(pm, x), expected, rtol=1e-5, atol=1e-6)
        pm.unmerge_adapter()
    pm.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(build("gpt_neox"), tmp_path).eval()
    with torch.no_grad():  # minilora's DoRA norms are fp32
        torch.testing.assert_close(output(peft_model, x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
def test_a_rank_above_a_parts_size_names_the_part_and_its_size():
    with pytest.raises(ValueError, match=r"part 'k' exceeds the part's size \(8 rows\)"):
        adapted("bigcode_mqa", ["q", "k"], r=9)


def test_a_fused_layer_whose_config_lacks_its_layout_fields_says_which():
    model = build("falcon_new")
    model.config.num_kv_heads = None
    with pytest.raises(ValueError, match="query_key_value: the model config .* lacks num_kv_heads"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q"]))
    model.config.new_decoder_architecture = None
    with pytest.raises(ValueError, match="lacks new_decoder_architecture"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["v"]))
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["query_key_value"]))  # whole: no layout needed
    assert list(at(pm, FUSED_QKV["falcon_new"]).parts["default"]) == ["full"]


def test_a_role_the_family_lacks_lists_the_roles_it_has():
    with pytest.raises(ValueError, match=r"'gate' names a role this model does not have.*Roles for gpt_neox: q, k, v, o, up, down"):
        get_peft_model(build("gpt_neox"), LoraConfig(r=2, target_modules=["q", "gate"]))
