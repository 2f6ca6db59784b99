"""Names that changed keep working for one release: each old name gives the new object, with a
FutureWarning that names the new spelling."""

import importlib
import json

import pytest
import torch

import minilora

RENAMED = [  # (module, old name, new name)
    ("minilora", "LoRALinear", "LoraLinear"),
    ("minilora.lora", "LoRALinear", "LoraLinear"),
    ("minilora.embedding", "LoRAEmbedding", "LoraEmbedding"),
    ("minilora.experts", "LoRAExperts", "LoraExperts"),
    ("minilora.conv", "LoRAConv", "LoraConv"),
    ("minilora.integrations", "Trainer", "LoraTrainer"),
    ("minilora.integrations.trainer", "Trainer", "LoraTrainer"),
    ("minilora.kernels", "nf4_dequant", "nf4_dequantize"),
    ("minilora.kernels", "nf4_dequant_reference", "nf4_dequantize_reference"),
]


@pytest.mark.parametrize("module, old, new", RENAMED)
def test_an_earlier_name_gives_the_new_object_with_a_warning(module, old, new):
    found = importlib.import_module(module)
    with pytest.warns(FutureWarning, match=f"{old} is now .*{new}"):
        assert getattr(found, old) is getattr(found, new)
    with pytest.raises(AttributeError, match="has no attribute 'LoRANothing'"):
        getattr(found, "LoRANothing")


def test_progress_is_now_progressbar(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with pytest.warns(FutureWarning, match=r"prune\(progress=...\) is now prune\(progressbar=...\)"):
        report = minilora.prune(model, 0.5, progress=False)
    assert report.sparsity_requested == 0.5 and report.sparsity_reached == pytest.approx(0.5, abs=0.02)


def test_progress_settings_are_now_progressbar():
    from minilora.experiments import DemoSettings
    from minilora.train import TrainConfig

    for settings in (TrainConfig, DemoSettings):
        with pytest.warns(FutureWarning, match=r"\(progress=...\) is now .*\(progressbar=...\)"):
            made = settings(progress=False)
        assert made.progressbar is False and made.progress is None
    assert "progressbar" not in TrainConfig().settings() and "progress" not in TrainConfig().settings()


def test_the_cli_still_takes_no_progress():
    import argparse

    from minilora.cli import _finetune_parser

    parser = _finetune_parser(argparse.ArgumentParser().add_subparsers())
    assert vars(parser.parse_args(["--no-progress"])) == vars(parser.parse_args(["--no-progressbar"])) == \
        {"progressbar": False}


def test_preference_settings_given_to_train_config_move_to_the_task_settings_with_a_warning():
    from minilora.train import PreferenceSettings, TrainConfig

    with pytest.warns(FutureWarning, match=r"task_settings=PreferenceSettings\(loss=..., beta=...\)"):
        config = TrainConfig(task="preference", beta=0.3, loss="ipo")
    assert config.task_settings == PreferenceSettings(loss="ipo", beta=0.3)
    assert config.settings()["beta"] == 0.3 and config.beta is None
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="belong to task='preference'"):
        TrainConfig(task="domain", beta=0.3)


def test_export_takes_prunes_names_and_the_reports_format(tmp_path, capsys):
    from conftest import gpt2_model_dir

    from minilora.cli import main

    base = gpt2_model_dir(tmp_path / "base")
    with pytest.warns(FutureWarning) as caught:
        report = minilora.export(base, out=tmp_path / "old", prune=0.5, prune_method="magnitude", prune_scope="layer",
                                 fmt="bf16", progressbar=False, print_report=False)
    said = " ".join(str(w.message) for w in caught)
    for old, new in (("prune", "sparsity"), ("prune_method", "method"), ("prune_scope", "scope"), ("fmt", "format")):
        assert f"export({old}=...) is now export({new}=...)" in said
    assert report.format == "bf16" and report.sparsity == pytest.approx(0.5, abs=0.01)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prune_ratio'"):
        minilora.export(base, out=tmp_path / "never", prune_ratio=0.5)
    assert main(["export", "--model", str(base), "--out", str(tmp_path / "cli"), "--prune", "0.5", "--nf4",
                 "--no-progressbar"]) == 0
    err = capsys.readouterr().err
    assert "--prune is now --sparsity 0.5" in err and "--nf4 is now --format nf4" in err
    saved = json.loads((tmp_path / "cli" / "export_report.json").read_text())
    assert saved["format"] == "nf4" and saved["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_the_article_plan_is_a_preset_and_the_requantization_report_is_read_from_the_merged_model():
    from minilora import LoraConfig, presets

    with pytest.warns(FutureWarning, match=r"LoraConfig.article\(\) is now minilora.presets.article\(\)"):
        assert LoraConfig.article(head=False) == presets.article(head=False)
    with pytest.warns(FutureWarning, match="minilora.ARTICLE_BANDS is now minilora.presets.ARTICLE_BANDS"):
        assert minilora.ARTICLE_BANDS is presets.ARTICLE_BANDS
    assert presets.preset("article") == presets.article()
    with pytest.raises(ValueError, match="unknown preset 'paper'; choose from article"):
        presets.preset("paper")

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=16))
    minilora.quantize_model(base)
    model = minilora.get_peft_model(base, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    merged = model.merge_and_unload(requantize=True)
    report = minilora.requantization_report(merged)
    assert report["requantized_layers"] == 2 and 0 < report["max_relative_error"] < 0.2
    with pytest.warns(FutureWarning, match="merge_report is now minilora.requantization_report"):
        assert model.merge_report == report
    with pytest.raises(ValueError, match="no layer of this model was packed again"):
        minilora.requantization_report(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
