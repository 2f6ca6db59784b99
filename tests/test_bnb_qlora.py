"""QLoRA the way most PEFT users run it: a base that transformers loads in 4 bits (or 8) with
bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True, ...)` or `(load_in_8bit=True)`, on the CPU
here), then prepare_model_for_kbit_training, LoRA, a training step and merge_and_unload. PEFT on
the same model and adapter is the oracle."""

import copy
import warnings

import peft
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import minilora as ml

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_kbit(path, bits):
    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")


@pytest.fixture(params=[4, 8], ids=["4-bit", "8-bit"])
def pair(model_dir, tmp_path, request):
    """(PEFT's model, minilora's) on two k-bit loads of one checkpoint, with the same acting adapter."""
    torch.manual_seed(1)
    bits = request.param
    theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(load_kbit(model_dir, bits)),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = ml.LoraModel.from_pretrained(ml.prepare_model_for_kbit_training(load_kbit(model_dir, bits)),
                                        tmp_path / "adapter", is_trainable=True)
    return theirs, ours


def lora_gradients(model) -> dict:
    """Adapter gradients by module path and matrix (A or B), whatever each library calls the tensors."""
    found = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            path = name.split(".lora_")[0].split("layers.", 1)[1]
            found[(path, "A" if ".lora_A." in name else "B")] = p.grad
    return found


def test_the_counts_are_peft_s(pair, model_dir, capsys):
    theirs, ours = pair
    theirs.print_trainable_parameters()
    ours.print_trainable_parameters()
    line_theirs, line_ours = capsys.readouterr().out.strip().splitlines()
    assert line_ours == line_theirs
    trainable, total = ours.get_nb_trainable_parameters()
    dense = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters())
    assert total == dense + trainable  # 4-bit weights counted as their values, not their packed bytes


def test_prepare_for_kbit_training_turns_checkpointing_on(pair):
    theirs, ours = pair
    assert theirs.get_base_model().is_gradient_checkpointing
    assert ours.get_base_model().is_gradient_checkpointing


def test_the_same_names_and_shapes_as_peft(pair):
    theirs, ours = pair
    shapes = lambda m: {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_the_same_loss_and_adapter_gradients(pair):
    theirs, ours = pair
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (theirs, ours):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    expected, got = lora_gradients(theirs), lora_gradients(ours)
    assert expected.keys() == got.keys() and len(got) == 2 * 2 * len(TARGETS)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=str(key))


def test_merge_and_unload_gives_peft_s_merged_model(pair):
    theirs, ours = pair
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = ours.eval()(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged_ours = ours.merge_and_unload()
        merged_theirs = theirs.eval().merge_and_unload()
        layer = merged_theirs.model.layers[0].self_attn.q_proj
        bits = 4 if type(layer).__name__ == "Linear4bit" else 8
        assert any(f"rounds the merged weight to {bits} bits" in str(w.message) for w in caught)
        assert type(merged_ours.model.layers[0].self_attn.q_proj) is type(layer)  # bitsandbytes', again
        expected, got = merged_theirs(input_ids=ids).logits, merged_ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the merged model computes the adapter's effect, up to the 4-bit rounding of the merged weight
    assert (got - unmerged).abs().mean() < 0.25 * (unmerged - base).abs().mean()


def test_a_safe_merge_checks_the_dequantized_weight(pair):
    _, ours = pair
    with torch.no_grad():
        next(p for n, p in ours.named_parameters() if "layers.1." in n and "lora_B" in n).view(-1)[0] = float("nan")
    before = {n: b.clone() for n, b in ours.get_base_model().state_dict().items() if b.dtype in (torch.uint8, torch.int8)}
    with pytest.raises(ValueError, match="nothing was merged"):
        ours.merge_and_unload(safe_merge=True)
    after = ours.get_base_model().state_dict()
    assert all(torch.equal(after[n], b) for n, b in before.items())


def test_state_dicts_cross_both_ways(pair):
    """A state dict of either library loads into the other, strictly wherever bitsandbytes can load
    its own layers' state dicts back (8-bit, before any forward pass; under PEFT as under minilora,
    checked on PEFT first). A 4-bit layer's quant-state entries are refused even by PEFT itself, so
    there the adapter's part of the state dict crosses: the same keys, nothing unexpected."""
    theirs, ours = pair
    try:
        copy.deepcopy(theirs).load_state_dict(theirs.state_dict(), strict=True)
        strict = True
    except RuntimeError:  # the peer's own limit, not minilora's
        strict = False
    assert strict == (type(theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt")
    part = (lambda m: m.state_dict()) if strict else (lambda m: {k: v for k, v in m.state_dict().items() if ".lora_" in k})
    with torch.no_grad():
        for name, p in [*ours.named_parameters(), *theirs.named_parameters()]:
            if ".lora_" in name:
                p.normal_(0, 0.1)  # two different adapters
        mine, peers = ({k: v.clone() for k, v in part(m).items()} for m in (ours, theirs))
        assert mine.keys() == peers.keys()
        assert not theirs.load_state_dict(mine, strict=strict).unexpected_keys
        assert not ours.load_state_dict(peers, strict=strict).unexpected_keys
    for model, source in ((theirs, mine), (ours, peers)):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in source.items() if ".lora_" in k)
