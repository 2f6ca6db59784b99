"""Packed rows (minilora/train/packing.py): every example of a packed row gets the loss it gets alone,
on GPT-2 (learned absolute positions), LLaMA (rotary) and with either loss; the scored tokens are
the same; and the trainer trains on packed rows."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import minilora as ml
from minilora.train.data import IGNORE, Examples, model_inputs
from minilora.train.packing import pack
from minilora.train.task import Domain
from minilora.train.trainer import TrainConfig, Trainer

V, T = 64, 24


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


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


def test_the_trainer_trains_on_packed_rows():
    model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    train, val = pack(instructions(24), T), pack(instructions(8, seed=1), T)
    result = Trainer(model, TrainConfig(task="instruction", steps=4, batch_size=2, eval_every=2, save_every=0,
                                        lr=1e-2, progressbar=False), train, val, log=lambda line: None).train()
    assert len(result.history) == 3 and result.history[-1]["val_loss"] < result.history[0]["val_loss"] + 1.0


def _packed_run(out, interrupt_at=None, resume=False):
    from conftest import interrupt_after

    torch.manual_seed(123)
    model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q", "v"], lora_dropout=0.1))
    config = TrainConfig(task="instruction", steps=6, batch_size=2, grad_accum=2, eval_every=2, save_every=2,
                         lr=1e-2, progressbar=False, gradient_checkpointing=True)
    trainer = Trainer(model, config, pack(instructions(40), T), pack(instructions(8, seed=1), T), out=out,
                      log=lambda line: None)
    assert trainer.chunked
    if interrupt_at is not None:
        interrupt_after(trainer, interrupt_at)
    return model, trainer.train(resume=resume)


def test_packed_rows_resume_bit_exact_with_checkpointing_and_accumulation(tmp_path):
    whole, whole_result = _packed_run(tmp_path / "whole")
    _, stopped = _packed_run(tmp_path / "parts", interrupt_at=3)
    assert stopped.stop_reason == "interrupted" and stopped.steps_done == 3
    resumed, result = _packed_run(tmp_path / "parts", resume=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert result.history == whole_result.history and len(result.history) == 4


def test_only_causal_rows_are_packed():
    preference = Examples({"input_ids": torch.zeros(2, 2, 4, dtype=torch.long),
                           "attention_mask": torch.ones(2, 2, 4, dtype=torch.long),
                           "labels": torch.zeros(2, 2, 4, dtype=torch.long)}, "preference")
    with pytest.raises(Exception, match="--pack packs domain and instruction rows; preference rows are not packed"):
        pack(preference, 8)


def test_minilora_finetune_pack_trains_on_packed_rows(tmp_path, capsys):
    from conftest import gpt2_model_dir, instruction_files

    from minilora.cli import main

    data, _ = instruction_files(tmp_path)
    model = gpt2_model_dir(tmp_path / "model")
    args = ["finetune", "--model", str(model), "--data", str(data), "--task", "instruction", "--tokenizer",
            "bytes", "--seq-len", "64", "--steps", "2", "--eval-every", "2", "--no-progressbar"]
    assert main([*args, "--out", str(tmp_path / "packed"), "--pack"]) == 0
    assert "packed:" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "refused"), "--pack", "--task", "preference"]) == 2
    assert "--pack packs domain and instruction rows, not --task preference" in capsys.readouterr().err
