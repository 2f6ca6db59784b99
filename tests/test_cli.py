"""Tier 3, end to end: `minilora finetune` on a shrunken default does real work and reports it."""

import json
import subprocess
import sys

from minilora.cli import main

SMALL = ["--layers", "2", "--width", "64", "--seq-len", "32", "--batch-size", "8", "--pretrain-steps", "150",
         "--finetune-steps", "80", "--eval-every", "20", "--lr-full", "3e-3"]
FIELDS = {"domain_loss_before", "domain_loss_after", "retain_loss_before", "retain_loss_after",
          "trainable_params", "total_params", "seconds", "peak_rss_mb"}


def test_finetune_writes_a_report_and_learns_the_domain(tmp_path):
    assert main(["finetune", "--out", str(tmp_path), *SMALL]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"full", "lora_all", "lora_article", "qlora_article"}
    for name, row in report.items():
        assert set(row) == FIELDS
        assert row["domain_loss_after"] < row["domain_loss_before"] - 0.4, name
        assert 0 < row["trainable_params"] <= row["total_params"] and row["peak_rss_mb"] > 0
    assert report["full"]["trainable_params"] == report["full"]["total_params"]
    assert max(report[n]["trainable_params"] for n in ("lora_all", "lora_article")) < report["full"]["total_params"] // 4
    assert report["qlora_article"]["trainable_params"] == report["lora_article"]["trainable_params"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("lora_all", "lora_article", "qlora_article"):
        assert {f.name for f in (tmp_path / "adapters" / name).iterdir()} == {"adapter_config.json",
                                                                            "adapter_model.safetensors"}
    assert not list(tmp_path.rglob(".*.tmp*"))  # atomic writes leave no temporaries

    # a second run reuses the cached base model and reproduces the numbers exactly
    logs = []
    from minilora.train.demo import DemoSettings, run

    settings = DemoSettings(out=str(tmp_path), strategies=("lora_article",), layers=2, width=64, seq_len=32,
                            batch_size=8, pretrain_steps=150, finetune_steps=80, eval_every=20, lr_full=3e-3)
    again = run(settings, log=logs.append)
    assert logs[0].startswith("base model: loaded")
    for key in ("domain_loss_before", "domain_loss_after", "retain_loss_after"):
        assert again["lora_article"][key] == report["lora_article"][key]


def test_bad_arguments_say_what_to_do():
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "finetune", "--strategies", "ful"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown strategy 'ful'; choose from full, lora_all, lora_article, qlora_article" in result.stderr
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "finetune", "--width", "40"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "multiple of 32" in result.stderr
