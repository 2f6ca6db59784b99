"""Exercise 4: merging and unmerging into GPT-2's Conv1D, against minilora's merge_adapter / unmerge_adapter."""

import copy

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model

D = 32
SLICES = {"q": (0, D), "v": (2 * D, 3 * D)}  # the columns each part writes in [q | k | v]
IDS = torch.tensor([[1, 5, 9, 2, 7]])


def qv_model():
    """A tiny GPT-2 with LoRA on Q and V and a non-zero B (init_lora_weights=False)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                            init_lora_weights=False)).eval()


def factors(c_attn, part):
    return c_attn.lora_A["default"][part].weight.detach(), c_attn.lora_B["default"][part].weight.detach()


def merged_by_hand(ex, c_attn):
    W = c_attn.base_layer.weight.detach()  # (d_in, 3d): Conv1D's layout
    for part, (first, end) in SLICES.items():
        W = ex.merge_conv1d(W, *factors(c_attn, part), c_attn.scaling["default"][part], first, end)
    return W


def test_delta_weight_is_s_B_A(ex):
    """(α/r)·B·A in fp32, shape (d_out, d_in); equal to minilora's delta_weight for each slice
    (the same fp32 product: to the last bit or an ulp)."""
    c_attn = qv_model().model.transformer.h[0].attn.c_attn
    for part in SLICES:
        A, B = factors(c_attn, part)
        delta = ex.delta_weight(A, B, 2.0)
        assert delta.shape == (D, D) and delta.dtype == torch.float32
        torch.testing.assert_close(delta, c_attn.delta_weight("default", part), atol=1e-7, rtol=1e-6)
    A, B = torch.ones(2, 3, dtype=torch.float16), torch.ones(4, 2, dtype=torch.float16)
    assert torch.equal(ex.delta_weight(A, B, 0.5), torch.ones(4, 3))


def test_merging_is_what_minilora_merges(ex):
    """The merged weight equals the one merge_adapter() writes (fp32, ~1 ulp), K's columns bit for bit,
    and the argument is left unchanged."""
    model = qv_model()
    c_attn = model.model.transformer.h[0].attn.c_attn
    W0 = c_attn.base_layer.weight.detach().clone()
    ours = merged_by_hand(ex, c_attn)
    assert torch.equal(c_attn.base_layer.weight, W0)  # not modified in place
    model.merge_adapter()
    theirs = c_attn.base_layer.weight.detach()
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6)
    assert torch.equal(ours[:, D:2 * D], W0[:, D:2 * D])
    assert not torch.allclose(ours[:, :D], W0[:, :D])


def test_a_merged_model_computes_what_the_adapter_computes(ex):
    """Writing the merged weights into a plain copy of the base gives the adapted model's logits
    (fp32: equal to ~1e-5 after two layers)."""
    model = qv_model()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        with model.disable_adapter():
            plain = copy.deepcopy(model.model)  # the base model, adapters still wrapped around it
            base_logits = model(input_ids=IDS).logits
    for block, plain_block in zip(model.model.transformer.h, plain.transformer.h):
        W = merged_by_hand(ex, block.attn.c_attn)
        plain_block.attn.c_attn = copy.deepcopy(block.attn.c_attn.base_layer)
        plain_block.attn.c_attn.weight = nn.Parameter(W)
    with torch.no_grad():
        merged_logits = plain(input_ids=IDS).logits
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)


def test_unmerging_restores_the_weight(ex):
    """Unmerging your merged weight gives W back to an fp32 rounding (|error| ≤ 1e-6 for weights of
    size ~0.02, K bit for bit), and unmerging minilora's merged weight gives what unmerge_adapter() gives."""
    model = qv_model()
    c_attn = model.model.transformer.h[1].attn.c_attn
    W0 = c_attn.base_layer.weight.detach().clone()
    W = merged_by_hand(ex, c_attn)
    for part, (first, end) in SLICES.items():
        W = ex.unmerge_conv1d(W, *factors(c_attn, part), c_attn.scaling["default"][part], first, end)
    torch.testing.assert_close(W, W0, atol=1e-6, rtol=0)
    assert torch.equal(W[:, D:2 * D], W0[:, D:2 * D])
    model.merge_adapter()
    theirs_merged = c_attn.base_layer.weight.detach().clone()
    ours = theirs_merged
    for part, (first, end) in SLICES.items():
        ours = ex.unmerge_conv1d(ours, *factors(c_attn, part), c_attn.scaling["default"][part], first, end)
    model.unmerge_adapter()
    torch.testing.assert_close(ours, c_attn.base_layer.weight.detach(), atol=1e-7, rtol=1e-6)
