"""LoRA per expert on mixture-of-experts weights stored as 3-D parameters (Mixtral, Qwen3-MoE, GPT-OSS)."""

import contextlib
import json

import peft
import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from peft import PeftModel
from torch.overrides import TorchFunctionMode
from zoo import MOE, build, ids, output

from minilora import LoraConfig, LoraModel, get_peft_model
from minilora import routed
from minilora.experts import LoraExperts
from minilora.roles import parameter_sites, supported_roles

EXPERTS = "model.layers.0.mlp.experts"
ROUTER = "model.layers.0.mlp.gate"


def adapted(case, targets, r=2, seed=0, **config):
    torch.manual_seed(seed)
    return get_peft_model(build(case), LoraConfig(r=r, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                                                  **config))


def experts_of(pm) -> LoraExperts:
    return pm.get_base_model().get_submodule(EXPERTS)


class _ActivationInput(TorchFunctionMode):
    """Records what the experts' gate code hands its activation: F.silu(gate) (Mixtral, Qwen3-MoE),
    torch.sigmoid(alpha · gate) (GPT-OSS)."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.silu, torch.sigmoid) and self.seen is None:
            self.seen = (func, args[0])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gate_and_up(experts_module, record: dict):
    """gate: what the model's own `_apply_gate` activates; up: the factor it multiplies by, read back."""
    cls = type(experts_module)
    original = cls._apply_gate

    def apply_gate(self, gate_up):
        mode = _ActivationInput()
        with mode:
            out = original(self, gate_up)
        func, seen = mode.seen
        if func is torch.sigmoid:  # GPT-OSS: (up + 1) · gate · σ(α·gate)
            gate = seen / self.alpha
            up = out / (gate * torch.sigmoid(seen)) - 1
        else:  # act(gate) · up
            gate, up = seen, out / F.silu(seen)
        record.setdefault("gate", gate.detach().clone())
        record.setdefault("up", up.detach().clone())
        return out

    cls._apply_gate = apply_gate
    try:
        yield
    finally:
        cls._apply_gate = original


def probe(pm, x):
    record = {}
    with torch.no_grad(), gate_and_up(experts_of(pm).base_layer, record):
        output(pm, x)
    return record


@pytest.mark.parametrize("case", MOE)
def test_the_expert_weights_are_sites_with_gate_up_and_down(case):
    model = build(case)
    sites = parameter_sites(model)
    gate_up = sites[f"{EXPERTS}.gate_up_proj"]
    assert [p.name for p in gate_up.parts] == ["gate", "up"]
    assert gate_up.parts[0].blocks == (16 if case == "gpt_oss" else 1)  # GPT-OSS interleaves gate and up
    assert sites[f"{EXPERTS}.down_proj"].role == "down"
    assert supported_roles(model) == ["q", "k", "v", "o", "up", "down", "gate"]


@pytest.mark.parametrize("role", ["gate", "up"])
@pytest.mark.parametrize("case", MOE)
def test_an_adapter_on_gate_or_up_changes_only_what_the_experts_read_as_that(case, role):
    pm = adapted(case, [role])
    assert list(experts_of(pm).parts["default"]["gate_up_proj"]) == [role]
    x = ids()
    with pm.disable_adapter():
        base = probe(pm, x)
    after = probe(pm, x)
    other = {"gate": "up", "up": "gate"}[role]
    torch.testing.assert_close(after[other], base[other], rtol=1e-4, atol=1e-4)  # read back by a division
    assert (after[role] - base[role]).abs().max() > 1e-2


@pytest.mark.parametrize("case", MOE)
def test_peft_loads_per_expert_parts_and_minilora_loads_them_back(case, tmp_path):
    pm = adapted(case, ["gate", "down", "q"])
    x = ids()
    with torch.no_grad():
        expected = output(pm, x)
        with pm.disable_adapter():
            assert not torch.allclose(output(pm, x), expected)
    pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                            for p in ("down_proj", "gate_up_proj")]
    theirs = PeftModel.from_pretrained(build(case), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(theirs, x), expected, rtol=1e-5, atol=1e-6)
    again = LoraModel.from_pretrained(build(case), tmp_path)
    assert list(experts_of(again).parts["default"]["gate_up_proj"]) == ["gate"]
    with torch.no_grad():
        torch.testing.assert_close(output(again, x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", MOE)
def test_a_peft_target_parameters_adapter_loads_in_minilora(case, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build(case), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                              target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                                              init_lora_weights=False)).eval()
    x = ids()
    with torch.no_grad():
        expected = output(theirs, x)
    theirs.save_pretrained(tmp_path)
    mine = LoraModel.from_pretrained(build(case), tmp_path)
    assert sorted(mine.peft_config["default"].target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    with torch.no_grad():
        torch.testing.assert_close(output(mine, x), expected, rtol=1e-6, atol=1e-7)
    def adapter_size(model):
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapter_size(mine) == adapter_size(theirs)


@pytest.mark.parametrize("case", MOE)
def test_merge_equals_unmerged_and_touches_only_the_parts_rows(case):
    pm = adapted(case, ["gate"])
    layer = experts_of(pm)
    up = layer.parts["default"]["gate_up_proj"]["gate"]
    W = layer.weight_of("gate_up_proj")
    before = W.detach().clone()
    x = ids()
    with torch.no_grad():
        unmerged = output(pm, x)
        pm.merge_adapter()
        torch.testing.assert_close(output(pm, x), unmerged, rtol=1e-5, atol=1e-6)
    gate_rows = up.rows(before, 1)
    assert not torch.equal(up.rows(W.detach(), 1), gate_rows)
    mask = torch.ones_like(before, dtype=torch.bool)
    up.rows(mask, 1).fill_(False)
    assert torch.equal(W.detach()[mask], before[mask])  # the up rows: bit for bit
    pm.unmerge_adapter()
    torch.testing.assert_close(W.detach(), before, rtol=0, atol=1e-6)


def test_an_moe_model_trains_only_its_adapter_and_the_router_stays_frozen():
    pm = adapted("mixtral", ["q", "v", "gate", "up", "down"], seed=1)
    pm.train()
    router = pm.get_base_model().get_submodule(ROUTER)
    assert not router.weight.requires_grad
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert any(".experts.lora_A." in n for n in trained)
    x = ids(batch=4, length=12)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, trained[n]) for n, p in pm.named_parameters() if p.requires_grad and "lora_A" in n)


def test_the_router_trains_when_asked_for():
    pm = adapted("mixtral", ["gate", "up", "down"], modules_to_save=["mlp.gate"])
    router = pm.get_base_model().get_submodule(ROUTER)
    assert router.modules_to_save["default"].weight.requires_grad
    assert not router.original_module.weight.requires_grad


@pytest.mark.parametrize("case", MOE)
def test_an_experts_lora_gets_gradient_only_from_the_tokens_routed_to_it(case):
    pm = adapted(case, ["gate", "up", "down"])
    layer = experts_of(pm)
    d = pm.get_base_model().config.hidden_size
    tokens = torch.randn(6, d, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1], [2, 1], [0, 2]])  # expert 3: no token
    weights = torch.full((6, 2), 0.5)
    readout = torch.randn(6, d, generator=torch.Generator().manual_seed(1))

    def grads(hidden):
        pm.zero_grad()
        (layer(hidden, index, weights) * readout).sum().backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}

    first = grads(tokens)
    assert all(g[3].abs().max() == 0 for g in first.values())  # expert 3 saw no token
    assert all(g[0].abs().max() > 0 for g in first.values())
    moved = tokens.clone()
    moved[4] += 1.0  # token 4 goes to experts 2 and 1, not 0
    second = grads(moved)
    for name, g in second.items():
        torch.testing.assert_close(g[0], first[name][0], rtol=0, atol=0)  # expert 0: unchanged
    assert any(not torch.equal(g[2], first[name][2]) for name, g in second.items())


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any new tensor (not a view of an op's inputs) an op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves

        def storages(tree):
            return {t.untyped_storage().data_ptr() for t in leaves(tree) if isinstance(t, torch.Tensor)}

        inputs = storages((args, kwargs))
        sizes = [t.untyped_storage().nbytes() // t.element_size() for t in leaves(out)
                 if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("case", MOE)
def test_the_routed_forward_equals_the_dense_delta_and_forms_no_delta(case):
    """The low-rank terms on the routed tokens (routed.py) give the outputs and gradients of W + ΔW, and
    no tensor as large as an expert stack exists in the forward or the backward pass."""
    pm = adapted(case, ["gate", "up", "down"])
    layer = experts_of(pm)
    assert routed.understands(layer.base_layer)
    d = pm.get_base_model().config.hidden_size
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(9, d, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])  # top-2 of 4 experts
    weights = torch.rand(9, 2, generator=g)
    params = [p for p in layer.parameters() if p.requires_grad]
    results, largest = {}, {}
    for route, forward in (("routed", layer), ("dense", lambda *a: layer.dense_delta_forward(["default"], *a))):
        x = tokens.clone().requires_grad_(True)
        with _LargestTensor() as mode:
            out = forward(x, index, weights)
            grads = torch.autograd.grad((out * out.detach().sin()).sum(), [x, *params])
        results[route], largest[route] = (out, grads), mode.largest
    torch.testing.assert_close(results["routed"][0], results["dense"][0], rtol=1e-5, atol=1e-6)
    for got, expected in zip(results["routed"][1], results["dense"][1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    stack = layer.weight_of("gate_up_proj").numel()  # (E, 2·d_ff, d)
    assert largest["dense"] >= stack > 2 * largest["routed"]


def test_all_linear_says_it_leaves_the_experts_out():
    with pytest.warns(UserWarning, match="'all-linear' adapts Linear layers only; the experts' 3-D weights"):
        pm = get_peft_model(build("mixtral"), LoraConfig(r=2, target_modules="all-linear"))
    assert not any(isinstance(m, LoraExperts) for m in pm.modules())


def test_bad_expert_targets_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="target_parameters entry 'experts.up_proj' matched no 3-D parameter.*"
                                         "experts.gate_up_proj"):
        get_peft_model(build("mixtral"), LoraConfig(r=2, target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match="lora_dropout=0.1 on expert weights"):
        get_peft_model(build("mixtral"), LoraConfig(r=2, target_modules=["down"], lora_dropout=0.1))
    with pytest.raises(ValueError, match=r"part 'gate' of gate_up_proj exceeds the part's size \(16 rows\)"):
        get_peft_model(build("mixtral"), LoraConfig(r=17, target_modules=["gate"]))


def test_expert_lora_traces_as_one_graph():
    torch.manual_seed(0)
    pm = get_peft_model(build("mixtral", num_hidden_layers=1),
                        LoraConfig(r=2, target_modules=["q", "gate", "up", "down"], init_lora_weights=False))
    dynamo.reset()
    explained = dynamo.explain(lambda x: pm(input_ids=x).logits)(ids())
    dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_expert_lora_compiles_as_one_graph_forward_and_backward():
    torch.manual_seed(0)
    pm = get_peft_model(build("gpt_oss", num_hidden_layers=1, layer_types=["full_attention"]),  # interleaved, biases
                        LoraConfig(r=2, target_modules=["gate", "up", "down"], init_lora_weights=False)).train()
    x = ids()
    params = [p for p in pm.parameters() if p.requires_grad]

    def step(model):  # the forward as one graph; its backward the graph AOTAutograd derived from it
        loss = model(input_ids=x, labels=x).loss
        return (loss, *torch.autograd.grad(loss, params))

    dynamo.reset()
    compiled = step(torch.compile(pm, backend="aot_eager", fullgraph=True))
    dynamo.reset()
    for got, expected in zip(compiled, step(pm)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_combining_expert_adapters_is_refused_with_the_reason():
    pm = adapted("mixtral", ["down"])
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["down"]))
    with pytest.raises(ValueError, match="experts holds an embedding or expert-weights adapter"):
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")


def test_several_adapters_share_the_experts_and_switch():
    pm = adapted("mixtral", ["gate", "down"])
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=3, target_modules=["up"], init_lora_weights=False))
    layer = experts_of(pm)
    assert {n: {p: list(parts) for p, parts in params.items()} for n, params in layer.parts.items()} == \
        {"default": {"gate_up_proj": ["gate"], "down_proj": ["full"]}, "other": {"gate_up_proj": ["up"]}}
    x = ids()
    with torch.no_grad():
        first = output(pm, x)
        pm.set_adapter("other")
        second = output(pm, x)
        assert not torch.allclose(first, second)
        pm.delete_adapter("other")
        pm.set_adapter("default")
        torch.testing.assert_close(output(pm, x), first, rtol=0, atol=0)
    assert "other" not in layer.lora_A
