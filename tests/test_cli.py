"""Tier 3, end to end: `minilora finetune` on a shrunken default does real work and reports it."""

import json
import subprocess
import sys

import pytest

from conftest import gpt2_model_dir, gpt2_of_vocab, instruction_files
from minilora.cli import main

SMALL = ["--layers", "2", "--width", "64", "--seq-len", "32", "--batch-size", "8", "--pretrain-steps", "150",
         "--finetune-steps", "80", "--eval-every", "20", "--lr-full", "3e-3", "--no-progressbar"]
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
        assert {f.name for f in (tmp_path / name / "adapter").iterdir()} == {
            "adapter_config.json", "adapter_model.safetensors", "minilora_config.json", "README.md"}
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 20, 40, 60, 80]
    assert not list(tmp_path.rglob(".*.tmp*"))  # atomic writes leave no temporaries

    from minilora.train.checkpoint import RunDirectoryError
    from minilora.experiments import DemoSettings, run

    settings = DemoSettings(out=str(tmp_path), strategies=("lora_article",), layers=2, width=64, seq_len=32,
                            batch_size=8, pretrain_steps=150, finetune_steps=80, eval_every=20, lr_full=3e-3,
                            progressbar=False)
    logs = []
    assert run(settings, log=logs.append)["lora_article"] == report["lora_article"]  # finished: reused
    assert logs[0].startswith("base model: loaded") and "finished by an earlier run" in logs[1]
    table = logs[-1].splitlines()  # the comparison, printed as docs/training-without-forgetting.md shows it
    assert table[0].startswith("| strategy | domain loss") and len(table) == 2 + 4
    assert table[2].startswith(f"| full | {report['full']['domain_loss_before']:.3f} → ")

    # started again, it reuses the cached base model and reproduces the numbers exactly
    settings.overwrite = True
    again = run(settings, log=logs.append)
    for key in ("domain_loss_before", "domain_loss_after", "retain_loss_before", "retain_loss_after"):
        assert again["lora_article"][key] == report["lora_article"][key]

    # alignment after SFT with no merge: DPO against lora_article's adapter, and qlora_article's on its NF4 base
    settings.overwrite, settings.strategies = False, ("lora_article_dpo_adapter", "qlora_article_dpo_adapter")
    aligned = run(settings, log=logs.append)
    for name, after in (("lora_article_dpo_adapter", "lora_article"), ("qlora_article_dpo_adapter", "qlora_article")):
        row = aligned[name]
        assert row["dpo_loss_before"] == pytest.approx(0.6931, abs=1e-4)  # the policy starts as the SFT model
        assert row["domain_loss_before"] == pytest.approx(report[after]["domain_loss_after"], abs=1e-5)
        assert row["reward_accuracy_after"] > row["reward_accuracy_before"]
        assert (tmp_path / name / "adapter" / "policy" / "adapter_model.safetensors").is_file()

    settings.strategies = ("lora_article",)
    settings.overwrite, settings.finetune_steps = False, 79
    with pytest.raises(RunDirectoryError, match="differ in: finetune_steps"):
        run(settings)


def test_bad_arguments_say_what_to_do():
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "finetune", "--strategies", "ful"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown strategy 'ful'; choose from full, lora_all, lora_article, qlora_article, " in result.stderr
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "finetune", "--width", "40"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "multiple of 32" in result.stderr


# ---------------------------------------------------------------------------------- your own model
def test_finetune_a_local_model_resume_and_refusals(tmp_path, capsys):
    model, (data, general) = gpt2_model_dir(tmp_path / "model"), instruction_files(tmp_path)
    out = tmp_path / "out"
    args = ["finetune", "--model", str(model), "--data", str(data), "--task", "instruction", "--tokenizer", "bytes",
            "--retain", str(general), "--replay-ratio", "0.25", "--seq-len", "64", "--steps", "24",
            "--eval-every", "8", "--lr", "1e-2", "--out", str(out), "--no-progressbar"]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["stop_reason"] == "completed" and result["val_loss_after"] < result["val_loss_before"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 8, 16, 24] and all(e["retain_loss"] > 0 for e in evals)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # the adapter loads in PEFT (Q and V slices of c_attn as one rank-16 LoRA) and computes the same
    import peft
    import torch
    from transformers import GPT2LMHeadModel

    from minilora import LoraModel

    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model), out / "adapter").eval()
    ours = LoraModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model), out / "adapter").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
        with ours.disable_adapter():
            assert not torch.allclose(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-3)
    assert theirs.peft_config["default"].r == 16

    capsys.readouterr()
    assert main(args) == 2 and "already holds a run; pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished: nothing left to do, same answer
    assert json.loads((out / "result.json").read_text())["val_loss_after"] == result["val_loss_after"]
    assert main([*args, "--resume", "--lr", "2e-2"]) == 2 and "differ in: lr" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--steps", "8", "--eval-every", "4"]) == 0


def test_qlora_preset_and_paged_optimizer_from_the_command_line(tmp_path, capsys):
    model, (_, general) = gpt2_model_dir(tmp_path / "model"), instruction_files(tmp_path)
    from minilora.experiments.corpus import DOMAIN, generate

    (tmp_path / "finance.txt").write_text(generate(DOMAIN, 120, 0))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(model), "--data", str(tmp_path / "finance.txt"), "--tokenizer", "bytes",
                 "--retain", str(general), "--qlora", "--preset", "article", "--optimizer", "paged_adamw",
                 "--forgetting-budget", "5.0", "--seq-len", "64", "--steps", "16", "--eval-every", "8",
                 "--out", str(out), "--no-progressbar"]) == 0
    printed = capsys.readouterr().out
    assert "quantized to NF4 while reading" in printed and "trainable params:" in printed
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    own = json.loads((out / "adapter" / "minilora_config.json").read_text())
    assert own["config"]["layer_bands"] and config["modules_to_save"] == ["lm_head"]
    result = json.loads((out / "result.json").read_text())
    assert result["val_loss_after"] < result["val_loss_before"]


def test_bad_input_to_a_local_run_says_what_to_do(tmp_path, capsys):
    model, (data, _) = gpt2_model_dir(tmp_path / "model"), instruction_files(tmp_path)
    base = ["finetune", "--model", str(model), "--data", str(data), "--task", "instruction", "--out",
            str(tmp_path / "o"), "--seq-len", "64", "--no-progressbar"]

    def error(extra, model_dir=None):
        args = list(base)
        if model_dir is not None:
            args[2] = str(model_dir)
        assert main(args + extra) == 2
        return capsys.readouterr().err

    assert "pass --tokenizer bytes" in error([])  # the model was saved without a tokenizer
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert "has no weights" in error(["--tokenizer", "bytes"], tmp_path / "empty")
    assert "not a Hugging Face model directory" in error(["--tokenizer", "bytes"], tmp_path)
    assert "unknown preset 'paper'" in error(["--tokenizer", "bytes", "--preset", "paper"])
    assert "needs a retain set" in error(["--tokenizer", "bytes", "--forgetting-budget", "0.1"])
    assert "pass one of them" in error(["--tokenizer", "bytes", "--resume", "--overwrite"])
    assert "nothing to resume" in error(["--tokenizer", "bytes", "--resume"])
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    base[4] = str(tmp_path / "broken.jsonl")
    assert "broken.jsonl line 2: not valid JSON" in error(["--tokenizer", "bytes"])
    base[4] = str(tmp_path / "missing.jsonl")
    assert "no such data file" in error(["--tokenizer", "bytes"])
    with pytest.raises(SystemExit):
        main(["finetune", "--data", str(data)])
    assert "--data needs --model DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--layers", "4"])
    assert "--layers belongs to the embedded default" in capsys.readouterr().err


def test_classify_with_a_real_pretrained_model_and_its_tokenizer(tmp_path, capsys):
    from test_qlora import minilm_dir

    rows = [{"text": f"{w} film, {a}", "label": "positive"} for w in ("a wonderful", "a great", "a moving")
            for a in ("truly", "really", "honestly", "simply")] + \
           [{"text": f"{w} film, {a}", "label": "negative"} for w in ("a boring", "a dull", "an awful")
            for a in ("truly", "really", "honestly", "simply")]
    import random

    random.Random(0).shuffle(rows)
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(minilm_dir()), "--data", str(tmp_path / "reviews.jsonl"), "--task",
                 "classification", "--qlora", "--seq-len", "16", "--steps", "20", "--eval-every", "10",
                 "--val-fraction", "0.25", "--lr", "3e-3", "--out", str(out), "--no-progressbar"]) == 0
    assert "quantized 37 layers to NF4" in capsys.readouterr().out  # 6 × 6 + the pooler; the new classifier is not
    result = json.loads((out / "result.json").read_text())
    assert result["val_loss_after"] < result["val_loss_before"] - 0.2
    assert json.loads((out / "labels.json").read_text()) == ["negative", "positive"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]


def test_adapter_config_files_minilora_peft_and_mistakes(tmp_path):
    from minilora.train.job import JobSettings, lora_config

    def read(raw, task="domain"):
        path = tmp_path / "lora.json"
        path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
        return lora_config(JobSettings(model="m", data="d", config=str(path)), task)

    ours = read({"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "layers_to_transform": [2, 3]})
    assert (ours.r, ours.lora_alpha, ours.target_modules, ours.task_type) == (4, 8, ["q", "v"], "CAUSAL_LM")
    peft_saved = read({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["query", "value"],
                       "task_type": "SEQ_CLS", "base_model_name_or_path": "x"}, "classification")
    assert (peft_saved.r, peft_saved.task_type) == (16, "SEQ_CLS")
    with pytest.raises(ValueError, match="unknown LoraConfig field\\(s\\) rank; the fields are"):
        read({"rank": 4})
    with pytest.raises(ValueError, match="not valid JSON"):
        read("{r: 4}")
    with pytest.raises(FileNotFoundError, match="no such config file"):
        lora_config(JobSettings(model="m", data="d", config=str(tmp_path / "nope.json")), "domain")


def test_ctrl_c_then_resume_from_the_command_line(tmp_path):
    import signal
    import time

    import torch

    model, (data, general) = gpt2_model_dir(tmp_path / "model"), instruction_files(tmp_path)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "minilora.cli", "finetune", "--model", str(model), "--data", str(data), "--task",
            "instruction", "--tokenizer", "bytes", "--retain", str(general), "--seq-len", "64", "--steps", "100000",
            "--eval-every", "5", "--save-every", "5", "--out", str(out), "--no-progressbar"]

    def interrupted_run(extra, after_step):
        """Start the command, press Ctrl-C once a checkpoint past `after_step` exists; the step it stopped at."""
        run = subprocess.Popen(args + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None:
            path = out / "checkpoint.pt"
            if path.exists() and torch.load(path, weights_only=True)["step"] > after_step:
                break
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
        assert run.returncode == 130, err[-2000:]
        assert "add --resume to continue" in err
        return torch.load(out / "checkpoint.pt", weights_only=True)["step"]

    first = interrupted_run([], 0)
    assert first >= 5 and not (out / "adapter").exists()
    second = interrupted_run(["--resume"], first)
    assert second > first
    evals = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals == list(range(0, evals[-1] + 1, 5)) and evals[-1] <= second  # one record per evaluation
    args[args.index("100000")] = "10"
    shorter = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert shorter.returncode == 2 and "differ in: steps" in shorter.stderr


def test_adapters_trained_together_from_the_command_line_equal_runs_of_their_own(tmp_path, capsys):
    import peft
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from minilora import LoraModel
    from minilora.routing import TagRouter

    model, (shout, general) = tmp_path / "model", instruction_files(tmp_path)
    gpt2_of_vocab(256).save_pretrained(model)  # without dropout: runs of their own draw no other masks
    words = ["Cat", "Dog", "Owl", "Fox", "Hen"]
    whisper = tmp_path / "whisper.jsonl"
    whisper.write_text("".join(json.dumps({"instruction": "Whisper the word", "input": w, "output": w.lower() + "..."})
                               + "\n" for w in words * 8))
    common = ["finetune", "--model", str(model), "--task", "instruction", "--tokenizer", "bytes", "--retain",
              str(general), "--seq-len", "64", "--steps", "24", "--eval-every", "8", "--lr", "1e-2", "--no-progressbar"]
    together = tmp_path / "together"
    assert main([*common, "--adapters", f"shout={shout},whisper={whisper}", "--batch-size", "4",
                 "--adapter-mix", "equal", "--out", str(together)]) == 0
    result = json.loads((together / "result.json").read_text())
    for name in ("shout", "whisper"):
        row = result["adapters"][name]
        assert row["stop_reason"] == "completed" and row["val_loss_after"] < row["val_loss_before"]
        assert row["retain_loss_before"] is not None
    router = TagRouter.load(together / "adapters")
    assert router.route(["<domain=whisper> Owl"]) == (["whisper"], ["Owl"])

    for name, data in (("shout", shout), ("whisper", whisper)):  # each equals a run of its own on its file
        alone = tmp_path / name
        assert main([*common, "--data", str(data), "--batch-size", "2", "--out", str(alone)]) == 0
        mine = load_file(together / "adapters" / name / "adapter_model.safetensors")
        theirs = load_file(alone / "adapter" / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys() and mine
        for key in mine:
            assert (mine[key] - theirs[key]).norm() <= 1e-5 * theirs[key].norm(), key

    # each saved adapter loads in PEFT and serves its rows of a mixed batch as minilora does
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = LoraModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model), together / "adapters" / "shout",
                                     adapter_name="shout")
    ours.load_adapter(together / "adapters" / "whisper", adapter_name="whisper")
    with torch.no_grad():
        mixed = ours.eval()(input_ids=ids, adapter_names=["whisper", "shout"]).logits
        for row, name in enumerate(["whisper", "shout"]):
            peer = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model), together / "adapters" / name)
            torch.testing.assert_close(mixed[row], peer.eval()(input_ids=ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)

    capsys.readouterr()
    for extra, message in (([f"--data={shout}", f"--adapters=shout={shout}"], "not both"),
                           ([f"--adapters=shout{shout}"], "is not NAME=FILE"),
                           ([f"--adapters=a={shout},a={whisper}"], "names 'a' twice"),
                           ([f"--adapters=__base__={shout}"], "reserved"),
                           ([f"--adapters=a={tmp_path / 'missing.jsonl'}"], "missing.jsonl")):
        assert main([*common, *extra, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_the_embedded_domains_strategies_train_one_adapter_per_domain_together_and_one_by_one(tmp_path):
    from minilora.experiments import DemoSettings, run
    from minilora.routing import TagRouter

    settings = DemoSettings(out=str(tmp_path), strategies=("lora_article_domains", "lora_article_domains_one_by_one"),
                            layers=2, width=64, seq_len=32, batch_size=4, pretrain_steps=60, finetune_steps=30,
                            eval_every=15, lr_full=3e-3, progressbar=False)
    logs = []
    report = run(settings, log=logs.append)
    for strategy in settings.strategies:
        for domain in ("finance", "medical", "legal"):
            row = report[f"{strategy}/{domain}"]
            assert row["domain_loss_after"] < row["domain_loss_before"] - 0.1, (strategy, domain)
            assert row["retain_loss_before"] is not None and row["seconds"] > 0
    for domain in ("finance", "medical", "legal"):  # the same adapters, the same data and starting weights
        together, alone = report[f"lora_article_domains/{domain}"], report[f"lora_article_domains_one_by_one/{domain}"]
        assert together["trainable_params"] == alone["trainable_params"]
        assert together["domain_loss_before"] == pytest.approx(alone["domain_loss_before"], abs=1e-5)
    saved = tmp_path / "lora_article_domains" / "adapters"
    assert TagRouter.load(saved).adapters == ["finance", "medical", "legal"]
    assert all((saved / d / "adapter_model.safetensors").is_file() for d in ("finance", "medical", "legal"))
    again = []
    run(settings, log=again.append)  # finished: reused
    assert sum("finished by an earlier run" in line for line in again) == 2
