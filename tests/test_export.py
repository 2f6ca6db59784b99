"""Export for deployment: merged (and pruned) models written as Hugging Face directories; the 4-bit
ones in bitsandbytes' serialized format, read by transformers + bitsandbytes and by minilora with
the same logits, both ways; atomic writes and the bad inputs refused."""

import copy
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import minilora as ml
from minilora.cli import main
from minilora.quant import Linear4bit
from minilora.quant.bnb_format import QUANT_STATE_KEY


def tiny(family, hidden=64, seed=0):
    """bitsandbytes' CPU kernels need rows of at least one 64-value block: layers 64 wide."""
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128, bos_token_id=0,
                             eos_token_id=0, pad_token_id=0)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(n_layer=2, n_embd=hidden, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def batches(n=2, seed=0):
    return [torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def base_and_adapter(tmp_path, family):
    base = tiny(family)
    base.save_pretrained(tmp_path / "base")
    pm = ml.get_peft_model(copy.deepcopy(base), ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                              init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    return pm


def logits(model, ids):
    """Logits with gradients enabled: bitsandbytes' CPU layer then takes its reference path (fp32
    scales); under no_grad with AVX512-BF16 it repacks the scales into bfloat16 (see docs/after-fine-tuning.md)."""
    return model(input_ids=ids).logits.detach()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nf4_export_loads_in_transformers_with_minilora_logits(tmp_path, family):
    pm = base_and_adapter(tmp_path, family)
    calib = batches()
    report = ml.export(tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "out", format="nf4", sparsity=0.5,
                       pattern="2:4", calibration=calib, progressbar=False, print_report=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    ours = ml.load_quantized(tmp_path / "out", model_class=AutoModelForCausalLM)
    layer = "model.layers.0.self_attn.q_proj" if family == "llama" else "transformer.h.0.attn.c_attn"
    assert type(theirs.get_submodule(layer)).__module__.startswith("bitsandbytes")
    assert isinstance(ours.get_submodule(layer), Linear4bit)
    for ids in calib:
        torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)
    # the adapter is in it: the export differs from the base exported alone, and tracks the merged model
    ml.export(tmp_path / "base", out=tmp_path / "plain", format="nf4", progressbar=False, print_report=False)
    plain = ml.load_quantized(tmp_path / "plain", model_class=AutoModelForCausalLM)
    assert not torch.allclose(logits(plain, calib[0]), logits(ours, calib[0]), atol=1e-3)
    assert report.format == "nf4" and 4.0 < report.bits_per_linear_weight < 4.2
    assert report.sparsity == pytest.approx(0.5)
    assert set(report.loss) == {"adapter", "merged", "pruned", "exported"}
    assert report.loss["merged"] == pytest.approx(report.loss["adapter"], rel=1e-5)
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())["format"] == "nf4"


def test_nf4_export_writes_the_bytes_and_keys_bitsandbytes_writes(tmp_path):
    """The same merged weights quantized by transformers + bitsandbytes and saved: same keys, same tensors."""
    base_and_adapter(tmp_path, "llama")
    ml.export(tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "fp32", progressbar=False,
              print_report=False)
    ml.export(tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "nf4", format="nf4", progressbar=False,
              print_report=False)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=bnb, device_map="cpu") \
        .save_pretrained(tmp_path / "bnb")
    ours, theirs = load_file(tmp_path / "nf4" / "model.safetensors"), load_file(tmp_path / "bnb" / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        if key.endswith(QUANT_STATE_KEY):
            mine, bnb_meta = json.loads(bytes(ours[key].tolist())), json.loads(bytes(tensor.tolist()))
            assert list(mine) == list(bnb_meta), key  # same fields, same order
            assert mine.pop("nested_offset") == pytest.approx(bnb_meta.pop("nested_offset"), rel=1e-6), key
            assert mine == bnb_meta, key
        elif key.endswith(".weight.absmax"):  # double-quant scale codes: bitsandbytes' search strays by one at most
            assert ours[key].dtype == tensor.dtype and (ours[key].int() - tensor.int()).abs().max() <= 1, key
        else:
            assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    expected = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in config.items() if k != "llm_int8_skip_modules"} == \
        {k: v for k, v in expected.items() if k != "llm_int8_skip_modules"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_transformers_bitsandbytes_checkpoint_loads_in_minilora_unchanged(tmp_path, family):
    tiny(family).save_pretrained(tmp_path / "fp")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bnb, device_map="cpu")
    theirs.save_pretrained(tmp_path / "q4")
    ours = ml.load_quantized(tmp_path / "q4", model_class=AutoModelForCausalLM)
    stored = load_file(tmp_path / "q4" / "model.safetensors")
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 2 * (7 if family == "llama" else 4)
    for name, layer in quantized.items():  # the checkpoint's codes and scales, not a re-quantization
        assert torch.equal(layer.packed, stored[f"{name}.weight"].reshape(-1)), name
        assert torch.equal(layer.absmax, stored[f"{name}.weight.absmax"]), name
    for ids in batches():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def test_export_over_a_qlora_base_dequantizes_it_first(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "fp")
    ml.export(tmp_path / "fp", out=tmp_path / "q4", format="nf4", progressbar=False, print_report=False)
    qlora = ml.get_peft_model(ml.load_quantized(tmp_path / "q4", model_class=AutoModelForCausalLM),
                              ml.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    qlora.save_pretrained(tmp_path / "adapter")
    ml.export(tmp_path / "q4", adapter=tmp_path / "adapter", out=tmp_path / "merged", progressbar=False,
              print_report=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = batches(1)[0]
    torch.testing.assert_close(logits(merged, ids), logits(qlora, ids), atol=1e-5, rtol=1e-5)


def test_fp32_and_bf16_exports(tmp_path):
    pm = base_and_adapter(tmp_path, "gpt2")
    ids = batches(1)[0]
    expected = logits(pm, ids)
    ml.export(tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "fp32", progressbar=False,
              print_report=False)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32"), ids), expected,
                               atol=1e-5, rtol=1e-5)
    report = ml.export(tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "bf16", format="bf16",
                       progressbar=False, print_report=False)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert report.bits_per_linear_weight == 16 and report.bytes_after < 0.6 * report.bytes_before


def test_an_existing_model_directory_is_refused_unless_overwrite(tmp_path):
    base_and_adapter(tmp_path, "llama")
    args = dict(adapter=tmp_path / "adapter", out=tmp_path / "out", progressbar=False, print_report=False)
    ml.export(tmp_path / "base", **args)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a model; pass --overwrite"):
        ml.export(tmp_path / "base", **args)
    ml.export(tmp_path / "base", sparsity=0.5, overwrite=True, **args)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # nothing left aside
    assert main(["export", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "out"), "--no-progressbar"]) == 2


def test_a_killed_export_leaves_no_model_directory(tmp_path, monkeypatch):
    """Killed after the weights are written, before the rename (no cleanup runs: rmtree does nothing):
    `out` does not exist, and what is left is a hidden partial directory. Interrupted, it cleans up."""
    base_and_adapter(tmp_path, "llama")
    module = importlib.import_module("minilora.exporting")

    def killed(partial, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "publish", killed)
    monkeypatch.setattr(module.shutil, "rmtree", lambda *args, **kwargs: None)
    args = dict(adapter=tmp_path / "adapter", out=tmp_path / "out", format="nf4", progressbar=False, print_report=False)
    with pytest.raises(KeyboardInterrupt):
        ml.export(tmp_path / "base", **args)
    assert not (tmp_path / "out").exists()
    left = [p for p in tmp_path.iterdir() if p.name not in ("base", "adapter")]
    assert len(left) == 1 and left[0].name.startswith(".out.partial-")
    assert (left[0] / "model.safetensors").is_file() and (left[0] / "export_report.json").is_file()
    monkeypatch.undo()  # interrupted with cleanup: nothing at all is left
    monkeypatch.setattr(module, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        ml.export(tmp_path / "base", **args)
    assert [p for p in tmp_path.iterdir() if p.name not in ("base", "adapter")] == left


def test_an_adapter_for_another_base_is_refused(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "base")
    other = ml.get_peft_model(tiny("llama", hidden=128), ml.LoraConfig(r=4, target_modules=["q"]))
    other.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"does not fit this base: base_model\.model\.model\.layers\.0\.self_attn\."
                                         r"q_proj\.lora_A\.weight has shape \(4, 128\), but model\.layers\.0\.self_attn"
                                         r"\.q_proj has weight shape \(out, in\) = \(64, 64\)"):
        ml.export(tmp_path / "base", adapter=tmp_path / "adapter", out=tmp_path / "out", progressbar=False)
    assert not (tmp_path / "out").exists()


def test_cli_export_prunes_and_writes_the_report(tmp_path, capsys):
    base_and_adapter(tmp_path, "gpt2")
    code = main(["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "out"), "--sparsity", "0.5", "--pattern", "2:4", "--format", "nf4", "--no-progressbar"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits per linear weight" in printed and "export_report.json" in printed
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5) and report["prune"]["pattern"] == "2:4"
    assert main(["export", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "bad"), "--sparsity", "1.0"]) == 2
    assert "sparsity must be a fraction in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["fp32", "nf4"])
def test_a_trained_head_untied_from_the_embeddings_stays_untied(tmp_path, fmt):
    """The article's plan trains GPT-2's tied LM head as its own copy: the export keeps that copy."""
    pm = ml.get_peft_model(tiny("gpt2"), ml.presets.article()).eval()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = batches(1)[0]
    expected = logits(pm, ids)
    trained_head = copy.deepcopy(pm).merge_and_unload().lm_head.weight.detach()
    assert not torch.equal(trained_head, pm.model.transformer.wte.weight)
    ml.export(pm, out=tmp_path / "out", format=fmt, progressbar=False, print_report=False)
    back = (AutoModelForCausalLM.from_pretrained(tmp_path / "out") if fmt == "fp32"
            else ml.load_quantized(tmp_path / "out", model_class=AutoModelForCausalLM))
    assert back.lm_head.weight is not back.transformer.wte.weight
    assert torch.equal(back.lm_head.weight, trained_head)  # the head is never quantized
    if fmt == "fp32":
        torch.testing.assert_close(logits(back, ids), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_what_minilora_cannot_read_is_refused(tmp_path):
    """An adapter for modules the base lacks, and a bitsandbytes FP4 checkpoint (minilora reads NF4)."""
    tiny("llama").save_pretrained(tmp_path / "base")
    ml.get_peft_model(tiny("gpt2"), ml.LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"names module 'transformer\.h\.0\.attn\.c_attn', which the base model "
                                         r"does not have"):
        ml.export(tmp_path / "base", adapter=tmp_path / "gpt2", out=tmp_path / "out", progressbar=False)
    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=fp4, device_map="cpu") \
        .save_pretrained(tmp_path / "fp4")
    with pytest.raises(ValueError, match="a bitsandbytes 'fp4' weight; minilora reads NF4 only"):
        ml.load_quantized(tmp_path / "fp4", model_class=AutoModelForCausalLM)
