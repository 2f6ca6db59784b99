"""Names that changed keep working for one release: each old name gives the new object, with a
FutureWarning that names the new spelling."""

import importlib

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
