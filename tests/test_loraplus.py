"""LoRA+: the optimizer groups against PEFT's, and training with them (Trainer and `minilora finetune`)."""

import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import minilora
from conftest import make
from minilora.optim import PagedAdamW, create_loraplus_optimizer
from minilora.experiments.corpus import DOMAIN, generate
from minilora.train.data import load_tokenizer, text_windows
from minilora.train.trainer import Trainer, TrainConfig

CASES = {  # family -> (LoraConfig keywords): biases, a LayerNorm and a full head in some of them
    "gpt2": dict(target_modules=["c_attn", "c_fc"], bias="all", modules_to_save=["ln_f"]),
    "llama": dict(target_modules=["q_proj", "v_proj"], bias="none"),
    "bert": dict(target_modules=["query", "value"], bias="lora_only", task_type="SEQ_CLS"),
}


def _groups(optimizer, names):
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("decay", [{}, {"loraplus_weight_decay": 0.1, "weight_decay": 0.3}])
def test_parameter_groups_equal_peft(family, decay):
    base = make(family)
    kwargs = dict(r=4, lora_alpha=8, **CASES[family])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**kwargs))
    their_opt = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **decay)
    our_opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **decay)
    their_names = {id(p): n for n, p in theirs.named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    expected = _groups(their_opt, their_names)
    assert _groups(our_opt, our_names) == expected
    assert expected[0][0] and expected[2][0] and expected[0][1] * 16 == expected[2][1]  # A and B both present
    if family != "llama":
        assert expected[3][0]  # biases / LayerNorm: B's lr without decay
    assert our_opt.defaults["weight_decay"] == their_opt.defaults["weight_decay"]


def test_bad_ratio_says_what_to_do():
    model = minilora.get_peft_model(make("gpt2"), minilora.LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        TrainConfig(loraplus_lr_ratio=-1.0).check()


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw"])
def test_trainer_with_loraplus_trains_and_uses_the_groups(optimizer):
    torch.manual_seed(0)
    model = minilora.get_peft_model(make("gpt2", n_layer=2), minilora.LoraConfig(r=4, lora_alpha=8,
                                                                                 target_modules=["q", "v"]))
    tok = load_tokenizer(None, "bytes")
    rows = text_windows(generate(DOMAIN, 200, 0), tok, 32)
    rows.tensors = {k: v % 128 for k, v in rows.tensors.items()}  # the tiny model's vocabulary
    train, val = rows.split(0.2)
    config = TrainConfig(steps=20, batch_size=4, lr=5e-3, eval_every=10, progressbar=False, optimizer=optimizer,
                         loraplus_lr_ratio=16.0, weight_decay=0.01, warmup_steps=0, min_lr_ratio=1.0)
    trainer = Trainer(model, config, train, val, log=lambda line: None)
    opt = trainer.optimizer
    assert isinstance(opt, PagedAdamW if optimizer == "paged_adamw" else torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    a, _, b, _ = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert a and all(".lora_A." in n for n in a) and b and all(".lora_B." in n for n in b)
    assert [g["lr"] for g in opt.param_groups] == [5e-3, 1e-6, 5e-3 * 16, 5e-3 * 16]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01, 0.01, 0.0]
    result = trainer.train()
    assert result.val_loss_after < result.val_loss_before - 0.1
    assert "loraplus_lr_ratio" in config.settings()  # a resumed run must use the same ratio


def test_finetune_with_the_flag_trains_and_records_the_ratio(tmp_path):
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from minilora.cli import main

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "model")
    (tmp_path / "finance.txt").write_text(generate(DOMAIN, 120, 0))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "finance.txt"),
                 "--tokenizer", "bytes", "--seq-len", "32", "--steps", "16", "--eval-every", "8", "--lr", "5e-3",
                 "--loraplus-lr-ratio", "16", "--out", str(out), "--no-progressbar"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["val_loss_after"] < result["val_loss_before"]
    assert json.loads((out / "run.json").read_text())["loraplus_lr_ratio"] == 16.0
