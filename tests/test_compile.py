"""A minilora model compiles as one graph: torch.compile(fullgraph=True) traces forward and backward
with no graph break, with one adapter active, with adapters disabled, and with a mixed batch; the
compiled model computes what the eager one does. PEFT's model is measured the same way, as a peer.

Most cases compute the loss outside the model; the last test passes `labels=` to GPT-2, whose
loss path in transformers 5.25 logs a warning (a graph break) unless the model names its loss.
"""

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from conftest import make

from minilora import LoraConfig, NF4Config, get_peft_model, quantize_model

CASES = {
    "gpt2_sliced_q_v": ("gpt2", ["q", "v"], False),  # two parts of the fused c_attn, K untouched
    "llama_q_v": ("llama", ["q", "v"], False),
    "qlora_llama_all_linear": ("llama", "all-linear", True),  # NF4 base under every adapter
}


def lora_model(family, targets, quantized=False):
    torch.manual_seed(0)
    base = make(family, n_layer=1 if quantized else 2)  # dynamo traces each layer alike: two show what four do,
    # and under every linear layer of the NF4 base one does
    if quantized:
        quantize_model(base, NF4Config(blocksize=64, double_quant=True), skip_modules=["lm_head"])
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def next_token_loss(model, ids, **kwargs):
    logits = model(input_ids=ids, **kwargs).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def graphs_and_breaks(fn, *args, **kwargs):
    dynamo.reset()
    explained = dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_count, explained.graph_break_count, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("case", CASES)
def test_one_graph_active_disabled_and_mixed(case):
    model = lora_model(*CASES[case])
    ids = torch.randint(1, 128, (2, 8))
    assert graphs_and_breaks(model, input_ids=ids) == (1, 0, [])

    def disabled(ids):
        with model.disable_adapter():
            return model(input_ids=ids).logits

    assert graphs_and_breaks(disabled, ids) == (1, 0, [])
    model.add_adapter("other", LoraConfig(r=2, target_modules=CASES[case][1], init_lora_weights=False))
    model.eval()
    assert graphs_and_breaks(model, input_ids=ids, adapter_names=["other", "default"]) == (1, 0, [])
    assert graphs_and_breaks(model, input_ids=ids, adapter_weights={"other": 0.5, "default": 0.5}) == (1, 0, [])


@pytest.mark.parametrize("case", CASES)
def test_compiled_forward_and_backward_match_eager(case):
    model = lora_model(*CASES[case])
    ids = torch.randint(1, 128, (2, 8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # traces the backward too

    def loss_and_grads(m, **kwargs):
        model.zero_grad()
        loss = next_token_loss(m, ids, **kwargs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(compiled)
    loss_eager, grads_eager = loss_and_grads(model)
    assert len(grads) == len(grads_eager) > 0
    torch.testing.assert_close(loss, loss_eager)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_eager[name], msg=name)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model.model(input_ids=ids).logits)
    model.add_adapter("other", LoraConfig(r=2, target_modules=CASES[case][1], init_lora_weights=False))
    model.eval()
    rows = ["other", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, adapter_names=rows).logits,
                                   model(input_ids=ids, adapter_names=rows).logits)


def test_qlora_graph_holds_the_nf4_custom_op():
    model = lora_model(*CASES["qlora_llama_all_linear"])
    ids = torch.randint(1, 128, (2, 8))
    dynamo.reset()
    explained = dynamo.explain(model)(input_ids=ids)
    ops = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert "minilora.nf4_matmul.default" in ops  # the compiler sees through Linear4bit, it does not break on it


def test_switching_adapters_recompiles_instead_of_computing_the_old_one():
    model = lora_model("llama", ["q", "v"])
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
    ids = torch.randint(1, 128, (2, 8))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        first = compiled(input_ids=ids).logits
        model.set_adapter("other")
        second = compiled(input_ids=ids).logits
        torch.testing.assert_close(second, model(input_ids=ids).logits)
    assert not torch.allclose(first, second)


def test_peft_peer_compiles_to_one_graph_too():
    """The same measurement on PEFT's model: if this fails, the tooling changed, not minilora."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(make("llama", n_layer=2), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(1, 128, (2, 8))
    assert graphs_and_breaks(model, input_ids=ids) == (1, 0, [])


@pytest.mark.parametrize("family,targets", [("gpt2", ["q", "v"]), ("llama", ["q", "v"])])
def test_dora_compiles_as_one_graph_and_matches_eager(family, targets):
    """DoRA's row norms come from a cache kept outside the graph in eager mode; inside a graph they
    are computed in it, so every layer traces into the same one graph."""
    torch.manual_seed(0)
    model = get_peft_model(make(family, n_layer=2), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                    init_lora_weights=False)).eval()
    ids = torch.randint(1, 128, (2, 8))
    assert graphs_and_breaks(model, input_ids=ids) == (1, 0, [])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    losses, grads = [], []
    for m in (compiled, model):
        model.zero_grad()
        loss = next_token_loss(m, ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1])
    assert any("lora_magnitude_vector" in n for n in grads[0])
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_gpt2_with_labels_compiles_as_one_graph_and_peft_needs_the_loss_named():
    """transformers (5.25 and later) logs a warning from GPT-2's loss when `loss_type` is unset, and
    the log call breaks fullgraph tracing. minilora names the loss transformers falls back to
    ("ForCausalLM"); PEFT's model breaks until the user does the same."""
    import peft

    ids = torch.randint(1, 128, (2, 8))
    ours = lora_model("gpt2", ["q", "v"])
    eager_loss = ours(input_ids=ids, labels=ids).loss
    dynamo.reset()
    compiled = torch.compile(lambda: ours(input_ids=ids, labels=ids).loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(), eager_loss)

    torch.manual_seed(0)
    theirs = peft.get_peft_model(make("gpt2", n_layer=2), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    theirs.base_model.model.loss_type = None  # as transformers leaves it for GPT-2
    if graphs_and_breaks(lambda: theirs(input_ids=ids, labels=ids).loss)[1] > 0:  # transformers >= 5.25
        theirs.base_model.model.loss_type = "ForCausalLM"  # the fix docs/compiling.md gives PEFT users
        assert graphs_and_breaks(lambda: theirs(input_ids=ids, labels=ids).loss)[1] == 0
