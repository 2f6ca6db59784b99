"""What `minilora finetune` does with input it cannot use: meaningless training numbers, data out of
proportion with itself, output directories it must not touch, and files that are not UTF-8. Each is
refused with exit status 2 and a message that names the setting or the file (and line), before
anything is allocated, written or deleted."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import gpt2_model_dir, instruction_files
from minilora.cli import main
from minilora.train.preference import PreferenceSettings

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GPT-2 (vocabulary 256, 64 positions), instruction data and general text."""
    folder = tmp_path_factory.mktemp("inputs")
    model = gpt2_model_dir(folder / "model")
    data, general = instruction_files(folder)
    return {"folder": folder, "model": model, "data": data, "general": general}


def finetune(files, out, *extra, data=None, task="instruction", model=None):
    """`minilora finetune` on the tiny model, a few steps; the exit status."""
    return main(["finetune", "--model", str(model or files["model"]), "--data", str(data or files["data"]),
                 "--task", task, "--tokenizer", "bytes", "--seq-len", "64", "--steps", "4", "--eval-every", "2",
                 "--out", str(out), "--no-progressbar", *extra])


def snapshot(folder):
    """Every file under a folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- training numbers
@pytest.mark.parametrize("flag, value, expected", [
    ("--min-delta", "nan", "min_delta must be >= 0 (how much lower a validation loss must be to count as "
                           "better), got nan; give --min-delta a finite number >= 0"),
    ("--weight-decay", "inf", "weight_decay must be >= 0 (AdamW's decoupled weight decay; 0: none), got inf"),
    ("--max-grad-norm", "nan", "max_grad_norm must be >= 0 (the global gradient norm to clip to; 0: no clipping), "
                               "got nan"),
    ("--patience", "-1", "patience must be >= 0 (evaluations without a better validation loss before stopping; "
                         "0: never), got -1; give --patience a whole number >= 0"),
    ("--lr", "nan", "lr must be > 0 (the peak learning rate), got nan"),
    ("--lr", "0", "lr must be > 0 (the peak learning rate), got 0.0"),
    ("--lr", "-0.001", "lr must be > 0"),
    ("--beta", "nan", "beta must be > 0"),
    ("--warmup-steps", "-2", "warmup_steps must be >= -1 (linear warmup steps; -1: a tenth of steps), got -2"),
    ("--warmup-steps", "5", "warmup_steps (5) must not exceed steps (4)"),
    ("--min-lr-ratio", "1.5", "min_lr_ratio must be in [0, 1]"),
    ("--min-lr-ratio", "-0.1", "min_lr_ratio must be in [0, 1]"),
    ("--label-smoothing", "0.5", "label_smoothing must be in [0, 0.5)"),
    ("--label-smoothing", "nan", "label_smoothing must be in [0, 0.5)"),
    ("--forgetting-budget", "-0.5", "forgetting_budget must be >= 0"),
    ("--forgetting-budget", "inf", "forgetting_budget must be >= 0 (how far the retain loss may rise; leave it "
                                   "out for no budget), got inf"),
    ("--replay-ratio", "1.5", "replay_ratio must be in [0, 1)"),
    ("--replay-ratio", "nan", "replay_ratio must be in [0, 1)"),
    ("--loraplus-lr-ratio", "inf", "loraplus_lr_ratio must be > 0"),
    ("--simpo-gamma", "-1", "simpo_gamma must be >= 0"),
    ("--batch-size", "0", "batch_size must be > 0"),
    ("--grad-accum", "0", "grad_accum must be > 0"),
    ("--steps", "-3", "steps must be > 0"),
    ("--save-every", "-1", "save_every must be >= 0"),
    ("--seed", "-1", "seed must be in [0, 4294967295] (the random seed), got -1"),
    ("--seed", str(2**70), "seed must be in [0, 4294967295]"),
    ("--val-fraction", "nan", "--val-fraction must be in (0, 1), got nan"),
])
def test_meaningless_training_numbers_are_refused_before_anything_is_written(files, tmp_path, capsys, flag, value,
                                                                             expected):
    out = tmp_path / "out"
    own = {f.name for f in dataclasses.fields(PreferenceSettings)}  # the flags of --task preference only
    task = "preference" if flag[2:].replace("-", "_") in own else "instruction"
    assert finetune(files, out, flag, value, task=task) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora finetune: error: ") and expected in err
    assert not out.exists()


def test_the_python_api_refuses_the_same_numbers():
    from minilora.train.trainer import TrainConfig, Trainer

    for bad, message in ((dict(min_delta=math.nan), "min_delta must be >= 0"),
                         (dict(weight_decay=math.inf), "weight_decay must be >= 0"),
                         (dict(max_grad_norm=math.nan), "max_grad_norm must be >= 0"),
                         (dict(patience=-1), "patience must be >= 0"),
                         (dict(steps=2.5), "steps must be > 0 .*got 2.5; give --steps a whole number"),
                         (dict(lr="fast"), "lr must be > 0 .*got 'fast'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).check()
        with pytest.raises(ValueError, match=message):  # the Trainer checks its config before it starts
            Trainer(torch.nn.Linear(2, 2), TrainConfig(**bad), None, None)
    TrainConfig(min_delta=0.0, weight_decay=0.0, max_grad_norm=0.0, patience=0, forgetting_budget=0.0).check()


def test_the_embedded_default_refuses_them_too(tmp_path, capsys):
    small = ["finetune", "--out", str(tmp_path / "demo"), "--layers", "1", "--width", "32", "--seq-len", "16",
             "--pretrain-steps", "1", "--finetune-steps", "1", "--strategies", "lora_all", "--no-progressbar"]
    assert main([*small, "--lr-lora", "nan"]) == 2
    assert "lr_lora must be > 0 (a peak learning rate), got nan" in capsys.readouterr().err
    assert main([*small, "--forgetting-budget", "-1"]) == 2
    assert "forgetting_budget must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_the_kept_adapter_is_the_step_the_result_names_even_when_no_step_is_better(tmp_path):
    """A validation set with nothing to score has a NaN loss at every evaluation: no step is ever better
    than step 0, so the result names step 0, and the adapter saved must be step 0's (the untrained one:
    every lora_B zero), not whatever the last step left."""
    from safetensors.torch import load_file

    from transformers import GPT2Config, GPT2LMHeadModel

    from minilora import LoraConfig, get_peft_model
    from minilora.experiments.corpus import DOMAIN, generate
    from minilora.train.data import IGNORE, Examples, load_tokenizer, text_windows
    from minilora.train.trainer import TrainConfig, Trainer

    tokens = load_tokenizer(None, "bytes")
    train = text_windows(generate(DOMAIN, 60, 0), tokens, 32)
    ids = train.tensors["input_ids"][:4]
    unscored = Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "labels": torch.full_like(ids, IGNORE)}, "domain")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    config = TrainConfig(steps=6, batch_size=4, lr=3e-2, eval_every=2, progressbar=False)
    result = Trainer(model, config, train, unscored, out=tmp_path, log=lambda line: None).train()
    assert result.best_step == 0 and math.isnan(result.val_loss_after)
    assert json.loads((tmp_path / "result.json").read_text())["best_step"] == 0
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # step 0's adapter, as the result says
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in trained)  # the model in memory was restored to it too


# ---------------------------------------------------------------------------------- tiny input, huge memory
def test_a_batch_larger_than_the_training_set_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert finetune(files, out, "--batch-size", "100000000") == 2
    err = capsys.readouterr().err
    # 40 examples, 4 held out for validation
    assert ("a step takes batch_size 100000000 × grad_accum 1 × 1 process(es) = 100000000 examples, more than the "
            "36 training examples; lower --batch-size to at most 36, or add data") in err
    assert finetune(files, out, "--batch-size", "4", "--grad-accum", "10") == 2
    assert "= 40 examples, more than the 36 training examples; lower --batch-size to at most 3" in \
        capsys.readouterr().err
    assert not out.exists()


def test_the_trainer_refuses_a_batch_larger_than_its_training_set():
    from minilora.train.data import Examples
    from minilora.train.trainer import TrainConfig, Trainer

    ids = torch.zeros(5, 8, dtype=torch.long)
    rows = Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, "domain")
    with pytest.raises(ValueError, match="= 6 examples, more than the 5 training examples"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(batch_size=3, grad_accum=2), rows, rows)


def test_integer_labels_must_be_in_proportion_with_the_examples(tmp_path):
    from minilora.train.data import DataError, load_tokenizer
    from minilora.train.tasks import load_examples

    tokens = load_tokenizer(None, "bytes")

    def load(labels):
        path = tmp_path / "labels.jsonl"
        path.write_text("".join(json.dumps({"text": f"row {i}", "label": x}) + "\n" for i, x in enumerate(labels)))
        return load_examples(path, "classification", tokens, 16)

    assert load([0, 2, 1]).label_names == ["0", "1", "2"]
    assert load([1, 1, 1]).label_names == ["0", "1"]  # a class without an example is allowed while K <= N
    assert load(["b", "a", 7]).label_names == ["7", "a", "b"]  # names: sorted, however many
    with pytest.raises(DataError, match=r"labels.jsonl line 3: label 5 would make 6 classes .* only 3 example\(s\), "
                                        r"so at least 3 class\(es\) would have none"):
        load([0, 1, 5])
    with pytest.raises(DataError, match="labels.jsonl line 2: label -1 is negative"):
        load([0, -1, 1])


def test_a_billion_as_a_label_is_refused_without_allocating(files, tmp_path):
    """One row labelled 1,000,000,000 once built a billion class names. Run in a child process whose
    memory is capped (a regression fails there, with MemoryError, instead of exhausting this machine);
    the refusal must come with exit status 2 and a peak memory no higher than after the imports."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "one row", "label": 1_000_000_000}) + "\n")
    child = textwrap.dedent(f"""
        import resource, sys
        cap = 3 * 2**30
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        from minilora.cli import main
        import transformers.models.gpt2
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        code = main(["finetune", "--model", {str(files["model"])!r}, "--data", {str(data)!r}, "--task",
                     "classification", "--tokenizer", "bytes", "--seq-len", "16", "--out", {str(tmp_path / "out")!r},
                     "--no-progressbar"])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(code, (after - before) // 1024)  # exit status, MiB of peak memory added by the run
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert done.returncode == 0, done.stderr
    code, added_mib = map(int, done.stdout.split()[-2:])
    assert code == 2 and added_mib < 50
    assert "one.jsonl line 1: label 1000000000 would make 1000000001 classes" in done.stderr
    assert "only 1 example(s)" in done.stderr and not (tmp_path / "out").exists()


def test_a_sequence_longer_than_the_model_reads_is_refused(files, tmp_path, capsys):
    assert finetune(files, tmp_path / "out", "--seq-len", "100000") == 2
    err = capsys.readouterr().err
    assert "--seq-len 100000 is longer than the model reads" in err
    assert "has n_positions = 64; lower --seq-len to at most 64" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_folder_that_holds_no_run(files, tmp_path, capsys):
    mydir = tmp_path / "mydir"
    (mydir / "adapter").mkdir(parents=True)
    (mydir / "adapter" / "important.txt").write_text("do not lose me")
    for extra in (["--overwrite"], []):
        assert finetune(files, mydir, *extra) == 2
        err = capsys.readouterr().err
        assert f"--out {mydir} already exists and holds no minilora run (no run.json) but 1 other entry " \
               "(e.g. adapter)" in err
        assert "pick another --out, or empty this one" in err
    assert snapshot(mydir) == {"adapter/important.txt": b"do not lose me"}

    (tmp_path / "a-file").write_text("mine")
    assert finetune(files, tmp_path / "a-file", "--overwrite") == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert finetune(files, empty) == 0  # an empty folder has nothing to lose
    assert (empty / "run.json").is_file() and (empty / "adapter").is_dir()


def test_a_finished_run_survives_an_overwrite_that_is_refused(files, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "out"
    assert finetune(files, out) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert {"run.json", "result.json", "checkpoint.pt", "adapter/adapter_model.safetensors"} <= before.keys()

    small = tmp_path / "small"  # a model whose embedding is smaller than the byte tokenizer's 256 tokens
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(small)
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    capsys.readouterr()
    refusals = [
        (dict(model=small), "the tokenizer has 256 tokens but the model's embedding only 128"),
        (dict(extra=("--batch-size", "1000")), "more than the 36 training examples"),
        (dict(data=bad_utf8), "bad.jsonl line 2: not valid UTF-8"),
        (dict(extra=("--lr", "nan")), "lr must be > 0"),
    ]
    for kw, message in refusals:
        assert finetune(files, out, "--overwrite", *kw.get("extra", ()), model=kw.get("model"),
                        data=kw.get("data")) == 2
        assert message in capsys.readouterr().err
        assert snapshot(out) == before, message  # not one byte of the finished run changed

    # an overwrite that goes ahead replaces the run's own files and nothing else
    assert finetune(files, out, "--overwrite", "--steps", "2", "--eval-every", "1") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "result.json").read_text())["steps_done"] == 2
    assert json.loads((out / "run.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------- data files
def test_invalid_utf8_names_the_file_and_the_line(files, tmp_path, capsys):
    text = tmp_path / "domain.txt"
    text.write_bytes(("plain words\n" * 40).encode() + b"more words\nabc \xff def\n" + b"tail\n" * 40)
    assert finetune(files, tmp_path / "out", data=text, task="domain") == 2
    assert ("domain.txt line 42: not valid UTF-8 (byte 0xff at byte 5 of the line: invalid start byte); save the "
            "file as UTF-8") in capsys.readouterr().err

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xc3", "output": "b"}\n')
    assert finetune(files, tmp_path / "out", data=rows) == 2
    assert "rows.jsonl line 3: not valid UTF-8 (byte 0xc3 at byte 21 of the line: invalid continuation byte)" in capsys.readouterr().err

    retain = tmp_path / "retain.txt"  # every file the run reads, not only --data
    retain.write_bytes(b"general text \xfe\n")
    assert finetune(files, tmp_path / "out", "--retain", str(retain)) == 2
    assert "retain.txt line 1: not valid UTF-8 (byte 0xfe" in capsys.readouterr().err

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\r\n{"instruction": "a", "output": "b"}\r\n{"instruction"\n')
    assert finetune(files, tmp_path / "out", data=broken) == 2
    assert "broken.jsonl line 3: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_utf8_files_with_a_byte_order_mark_and_windows_line_ends_still_load(tmp_path):
    from minilora.train.data import load_tokenizer, read_jsonl, read_text
    from minilora.train.tasks import load_examples

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "caf\xc3\xa9", "output": "b"}\r\n\r\n'
                     + b'{"instruction": "x", "output": "y"}\r\n')
    assert [(n, r["instruction"]) for n, r in read_jsonl(rows)] == [(1, "café"), (3, "x")]
    assert len(load_examples(rows, "instruction", load_tokenizer(None, "bytes"), 32)) == 2
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbfhello")
    assert read_text(text) == "hello"
