"""One process of data-parallel fine-tunes (run by torchrun), or the single-process reference.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT     per-process batch 2
    python tests/ddp_worker.py OUT                                       one process, batch 4

Both see the same global batch of 4 rows per step, the loss chunked (the trainer's default), in
three runs: "default"; "checkpointing_packed", with activation checkpointing and packed rows
(packing.py: position ids restarting at each of the examples, here text windows of varied
lengths); "together", two adapters trained in one pass (together.py), two rows each per step;
"dpo", preference tuning (dpo_ddp_worker.py). Each process writes each run's adapters to
OUT/<run>/rank<r>.safetensors.
"""

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import dpo_ddp_worker
from minilora import LoraConfig, get_peft_model
from minilora.experiments.corpus import DOMAIN, GENERAL, generate
from minilora.train.data import load_tokenizer, text_windows
from minilora.train.distributed import teardown
from minilora.train.packing import pack
from minilora.train.together import AdapterData, TogetherTrainer
from minilora.train.trainer import Trainer, TrainConfig

GLOBAL_BATCH = 4


RUNS = ("default", "checkpointing_packed", "together")


def train(out: Path, checkpointing: bool = False, packed: bool = False, together: bool = False) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    tokens = load_tokenizer(None, "bytes")
    if together:
        model.add_adapter("general", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    data = text_windows(generate(DOMAIN, 150, 0), tokens, 32)
    val = text_windows(generate(DOMAIN, 20, 1), tokens, 32)
    retain = text_windows(generate(GENERAL, 20, 2), tokens, 32)
    if packed:  # windows cut to 8–31 tokens, several to a row
        lengths = 8 + torch.arange(len(data)) * 7 % 24
        data.tensors["attention_mask"] = (torch.arange(32) < lengths[:, None]).long()
        data.tensors["labels"] = data.tensors["labels"].masked_fill(data.tensors["attention_mask"] == 0, -100)
        data = pack(data, 32)
    config = TrainConfig(steps=6, batch_size=GLOBAL_BATCH // world, lr=1e-2, eval_every=3, progressbar=False,
                         gradient_checkpointing=checkpointing)
    if together:
        domains = {"default": AdapterData(data, val), "general": AdapterData(retain, val)}
        trainer = TogetherTrainer(model, replace(config, adapter_mix="equal"), domains, log=lambda line: None)
    else:
        trainer = Trainer(model, config, data, val, retain, log=lambda line: None)
    assert trainer.chunked and model.get_base_model().is_activation_checkpointing == checkpointing
    assert ("position_ids" in trainer.train_set.tensors) == packed
    first_grads = {}
    step = trainer.optimizer.step

    def step_and_record(*args, **kwargs):  # the gradients of the first step, after the all-reduce
        if not first_grads:
            first_grads.update({f"grad.{n}": p.grad.detach().clone() for n, p in trainer.named})
        return step(*args, **kwargs)

    trainer.optimizer.step = step_and_record
    result = trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state.update(first_grads)
    after = result.adapters["default"].val_loss_after if together else result.val_loss_after
    state["val_loss_after"] = torch.tensor(after, dtype=torch.float64)
    run = out / ("together" if together else "checkpointing_packed" if checkpointing else "default")
    run.mkdir(exist_ok=True)
    save_file(state, run / f"rank{rank}.safetensors")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    train(out)
    train(out, checkpointing=True, packed=True)
    train(out, together=True)
    (out / "dpo").mkdir(exist_ok=True)
    dpo_ddp_worker.train(out / "dpo")
    teardown()
