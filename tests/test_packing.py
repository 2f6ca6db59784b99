"""Packed rows (minilora/train/packing.py): every example of a packed row gets the loss it gets alone,
on GPT-2 (learned absolute positions), LLaMA (rotary) and with either loss; the scored tokens are
the same; and the trainer trains on packed rows."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import gpt2_of_vocab, llama_of_vocab

import minilora as ml
from minilora.train.data import IGNORE, Examples, model_inputs
from minilora.train.packing import pack
from minilora.train.task import Domain
from minilora.train.trainer import TrainConfig, Trainer

V, T = 64, 24


def gpt2():
    return gpt2_of_vocab(V, positions=64)


def llama():
    return llama_of_vocab(V)


def instructions(n=9, seed=0):
    """Instruction-like rows of varied lengths, padded on the right, the first tokens a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    labels = torch.full((n, T), IGNORE)
    for i in range(n):
        length = int(torch.randint(4, T // 2, (1,), generator=g))
        ids[i, :length] = torch.randint(1, V, (length,), generator=g)
        mask[i, :length] = 1
        labels[i, 2:length] = ids[i, 2:length]  # a two-token prompt
    return Examples({"input_ids": ids, "attention_mask": mask, "labels": labels}, "instruction")


def token_losses(model, batch):
    """Per-token CE (B, T−1), 0 where not scored."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none")


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_each_packed_example_gets_the_loss_it_gets_alone(make):
    model = ml.get_peft_model(make(), ml.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)).eval()
    examples = instructions()
    packed = pack(examples, T)
    assert len(packed) < len(examples)  # rows were shared
    assert (packed.tensors["labels"][:, 1:] != IGNORE).sum() == (examples.tensors["labels"][:, 1:] != IGNORE).sum()
    with torch.no_grad():
        alone = [token_losses(model, examples.rows(torch.tensor([i])))[0].sum() for i in range(len(examples))]
        together = token_losses(model, packed.tensors)  # (M, T−1)
    # each example's tokens in the packed rows: find it by its token ids and positions
    found = []
    for r in range(len(packed)):
        starts = (packed.tensors["position_ids"][r] == 0).nonzero().flatten().tolist() + [T]
        for a, b in zip(starts, starts[1:]):
            found.append((packed.tensors["input_ids"][r, a:b], together[r, max(a - 1, 0):b - 1].sum()))
    for i, loss in enumerate(alone):
        n = int(examples.tensors["attention_mask"][i].sum())
        match = [total for tokens, total in found if len(tokens) == n and torch.equal(tokens, examples.tensors["input_ids"][i, :n])]
        assert match, i
        torch.testing.assert_close(match[0], loss, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the summed loss, plain and chunked, is the sum of the examples' losses
        expected = torch.stack(alone).sum()
        torch.testing.assert_close(Domain().summed_loss(model, packed.tensors), expected, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(Domain().summed_loss(model, packed.tensors, chunked=True), expected, atol=1e-4,
                                   rtol=1e-5)


def test_a_model_that_lets_packed_examples_see_each_other_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    from minilora.train.packing import check_model, packing_error

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))
    assert packing_error(opt) > 1e-2  # its mask comes from the attention mask alone: the examples mix
    with pytest.raises(ValueError, match="OPTForCausalLM does not keep packed examples apart"):
        check_model(opt)
    for make in (gpt2, llama):
        assert packing_error(make()) < 1e-5
        check_model(ml.get_peft_model(make(), ml.LoraConfig(r=4, target_modules=["q", "v"])))


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_the_trainer_trains_on_packed_rows(qlora):
    base = llama()
    if qlora:
        ml.quantize_model(base, ml.NF4Config(blocksize=32))
    model = ml.get_peft_model(base, ml.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    train, val = pack(instructions(24), T), pack(instructions(8, seed=1), T)
    trainer = Trainer(model, TrainConfig(task="instruction", steps=4, batch_size=2, eval_every=2, save_every=0,
                                         lr=1e-2, progressbar=False), train, val, log=lambda line: None)
    padded_before = trainer.evaluate(instructions(8, seed=1))  # the same examples, one per row
    result = trainer.train()
    assert result.history[0]["val_loss"] == pytest.approx(padded_before, rel=1e-5)
    assert len(result.history) == 3 and result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def _packed_run(task, out, interrupt_at=None, resume=False):
    from conftest import interrupt_after

    torch.manual_seed(123)
    model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q", "v"], lora_dropout=0.1))
    config = TrainConfig(task=task, steps=6, batch_size=2, grad_accum=2, eval_every=2, save_every=2,
                         lr=1e-2, progressbar=False, gradient_checkpointing=True)
    rows = instructions if task == "instruction" else preference_pairs
    trainer = Trainer(model, config, pack(rows(40), T), pack(rows(8, seed=1), T), out=out, log=lambda line: None)
    assert trainer.chunked
    if interrupt_at is not None:
        interrupt_after(trainer, interrupt_at)
    return model, trainer.train(resume=resume)


@pytest.mark.parametrize("task", ["instruction", "preference"])
def test_packed_rows_resume_bit_exact_with_checkpointing_and_accumulation(task, tmp_path):
    whole, whole_result = _packed_run(task, tmp_path / "whole")
    _, stopped = _packed_run(task, tmp_path / "parts", interrupt_at=3)
    assert stopped.stop_reason == "interrupted" and stopped.steps_done == 3
    resumed, result = _packed_run(task, tmp_path / "parts", resume=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert result.history == whole_result.history and len(result.history) == 4


def test_only_causal_lm_rows_are_packed():
    classes = Examples({"input_ids": torch.zeros(2, 4, dtype=torch.long),
                        "attention_mask": torch.ones(2, 4, dtype=torch.long),
                        "labels": torch.zeros(2, dtype=torch.long)}, "classification")
    with pytest.raises(Exception, match="--pack packs domain, instruction, preference rows; classification rows"):
        pack(classes, 8)


# ---------------------------------------------------------------------------------------------- pairs
def preference_pairs(n=7, seed=0):
    """Pairs of varied lengths (P, 2, T), padded on the right: a masked prompt, then each answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 2, T, dtype=torch.long)
    mask = torch.zeros(n, 2, T, dtype=torch.long)
    labels = torch.full((n, 2, T), IGNORE)
    for i in range(n):
        prompt = torch.randint(1, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        for answer in (0, 1):
            response = torch.randint(1, V, (int(torch.randint(1, T - 6, (1,), generator=g)),), generator=g)
            row = torch.cat([prompt, response])
            ids[i, answer, :len(row)], mask[i, answer, :len(row)] = row, 1
            labels[i, answer, len(prompt):len(row)] = response
    return Examples({"input_ids": ids, "attention_mask": mask, "labels": labels}, "preference")


def preference_objective(model, chunked, **settings):
    from minilora.train.distributed import Processes
    from minilora.train.preference import PreferenceObjective

    config = TrainConfig(task="preference", chunked_loss=chunked, eval_batch_size=3, task_settings=settings)
    return PreferenceObjective(model, config, Processes())


def trained_looking(make):
    model = ml.get_peft_model(make(), ml.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_packed_pairs_get_the_log_probs_they_get_padded(make, chunked):
    from minilora.train.packing import SEQUENCE
    from minilora.train.preference import pairs_in, sequence_logps

    pairs = preference_pairs()
    packed = pack(pairs, T)
    assert packed.tensors["input_ids"].shape[1] == 2 * T and len(packed) < len(pairs)  # several pairs per row
    assert sorted(set(packed.tensors[SEQUENCE].flatten().tolist()) - {-1}) == list(range(2 * len(pairs)))
    assert packed.tensors["position_ids"].max() < T  # no position a padded row would not have
    model = trained_looking(make)
    objective = preference_objective(model, chunked)
    assert objective.chunked == chunked
    with torch.no_grad():
        padded_logps, padded_counts = sequence_logps(model, pairs.tensors, chunked=chunked)
        packed_logps, packed_counts = sequence_logps(model, packed.tensors, chunked=chunked)
    assert pairs_in(packed.tensors) == len(pairs)
    torch.testing.assert_close(packed_logps, padded_logps, atol=1e-5, rtol=1e-5)  # pairs in their data order
    assert torch.equal(packed_counts, padded_counts) and packed_counts.min() > 0
    padded_metrics = objective.evaluate(pairs, contextlib.nullcontext)
    packed_metrics = objective.evaluate(packed, contextlib.nullcontext)
    assert padded_metrics.keys() == packed_metrics.keys() and padded_metrics["kl"] > 0
    for name, value in padded_metrics.items():
        assert packed_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_a_packed_pairs_stored_reference_is_the_computed_one_and_the_gradients_agree():
    model = trained_looking(llama).train()
    objective = preference_objective(model, True, precompute_ref=True)
    pairs = preference_pairs(6, seed=3)
    packed = objective.prepare(pack(pairs, T))
    assert "ref_token_logps" in packed.tensors
    padded = objective.prepare(pairs)
    stored = objective.stored_reference(packed.tensors)
    torch.testing.assert_close(stored, objective.stored_reference(padded.tensors), atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for name, rows in (("packed", packed), ("padded", padded)):
        loss = objective.summed(rows.tensors)
        grads[name] = (loss, torch.autograd.grad(loss, params))
    torch.testing.assert_close(grads["packed"][0], grads["padded"][0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads["packed"][1], grads["padded"][1]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_minilora_finetune_pack_trains_on_packed_rows(tmp_path, capsys):
    from conftest import gpt2_model_dir, instruction_files

    from minilora.cli import main

    data, _ = instruction_files(tmp_path)
    model = gpt2_model_dir(tmp_path / "model")
    args = ["finetune", "--model", str(model), "--data", str(data), "--task", "instruction", "--tokenizer",
            "bytes", "--seq-len", "64", "--steps", "2", "--eval-every", "2", "--no-progressbar"]
    assert main([*args, "--out", str(tmp_path / "packed"), "--pack"]) == 0
    assert "packed:" in capsys.readouterr().out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}: which? ", "chosen": "yes" * (1 + i % 5),
                                         "rejected": "no" * (1 + i % 3)}) + "\n" for i in range(40)))
    preference = [a if a != str(data) else str(pairs) for a in args]
    preference[preference.index("instruction")] = "preference"
    assert main([*preference, "--out", str(tmp_path / "pairs"), "--pack"]) == 0
    out = capsys.readouterr().out
    assert "packed:" in out and "rows of 128 tokens" in out  # 2 · --seq-len: what one padded pair takes
    metrics = [json.loads(line) for line in (tmp_path / "pairs" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_accuracy" in m for m in metrics)
    assert main([*args, "--out", str(tmp_path / "refused"), "--pack", "--task", "classification"]) == 2
    assert "--pack packs domain, instruction, preference rows, not --task classification" in capsys.readouterr().err
