"""One process of a sharded (FSDP2) fine-tune run by torchrun, or the single-process reference.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_worker.py OUT CASE…     --parallel fsdp
    python tests/fsdp_worker.py OUT CASE…                                       one process

A CASE is `lora-adamw`, `qlora-paged_adamw`, `qlora_head-adamw` … (model kind, optimizer; _head: the LM
head trains too, as modules_to_save; _checkpointed: with activation checkpointing), `resume` (QLoRA trained
to step 6, interrupted, resumed to the end), `mixed` (a mixed-batch forward, sharded and whole) or `refuse=DIR` (resuming DIR's checkpoint must be
refused: it was written by another number of processes). Every run sees the same global batch of
GLOBAL_BATCH rows per step. Each process writes OUT/CASE/rank<r>.json: the loss of every step,
facts about its first gradients and its resident base bytes; the trainer writes OUT/CASE/adapter.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minilora import LoraConfig, get_peft_model
from minilora.quant import Linear4bit, NF4Config, quantize_model
from minilora.train.checkpoint import RunDirectoryError
from minilora.experiments.corpus import DOMAIN, GENERAL, generate
from minilora.train.data import load_tokenizer, text_windows
from minilora.train.distributed import teardown
from minilora.train.fsdp import local, local_bytes
from minilora.train.trainer import Trainer, TrainConfig

GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 processes
STEPS = 10


def tiny_llama(qlora: bool, head: bool = False) -> torch.nn.Module:
    """A LLaMA-style model (RMSNorm, rotary, grouped KV heads, SwiGLU), its linear layers in NF4 for QLoRA;
    with `head`, the LM head trains too (modules_to_save)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if qlora:
        quantize_model(model, NF4Config(blocksize=64, double_quant=True), skip_modules=["lm_head"])
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "down"],
                                            modules_to_save=["lm_head"] if head else None))


def data():
    tokens = load_tokenizer(None, "bytes")
    return (text_windows(generate(DOMAIN, 120, 0), tokens, 32), text_windows(generate(DOMAIN, 3, 1), tokens, 32),
            text_windows(generate(GENERAL, 3, 2), tokens, 32))  # 8 and 5 rows


def trainer(case: str, out: Path, world: int, steps: int = STEPS, **extra) -> Trainer:
    kind, optimizer = case.split("-") if "-" in case else ("qlora", "adamw")
    config = TrainConfig(steps=steps, batch_size=GLOBAL_BATCH // world, lr=1e-2, eval_every=10, eval_batch_size=2,
                         save_every=3, optimizer=optimizer, progressbar=False, gradient_checkpointing="checkpointed" in kind,
                         parallel="fsdp" if world > 1 else "ddp", **extra)
    train, val, retain = data()
    return Trainer(tiny_llama(kind.startswith("qlora"), kind.endswith("head")), config, train, val, retain, out=out, log=lambda line: None)


def recorded(t: Trainer, record: dict, stop_after: int = 0) -> Trainer:
    """Record each step's loss and the first step's gradients; set the interrupt flag after `stop_after` steps."""
    step = t._train_step

    def step_and_record():
        loss, norm = step()
        record["losses"].append(loss)
        if stop_after and t.step == stop_after:
            t._interrupted = True
        return loss, norm

    def optimizer_step(*args, original=t.optimizer.step, **kwargs):
        record["calls"] = record.get("calls", 0) + 1
        if record["calls"] == 2:  # step 2 (at step 1 every lora_A has zero gradient: B = 0); this process's shards
            grads = {n: local(p.grad) for n, p in t.named if p.grad is not None}
            record["grads"] = {"count": len(grads), "params": len(t.named),
                               "finite": all(bool(torch.isfinite(g).all()) for g in grads.values()),
                               "nonzero": sum(int(g.abs().sum() > 0) for g in grads.values()),
                               "nonempty": sum(int(g.numel() > 0) for g in grads.values())}
        return original(*args, **kwargs)

    t._train_step = step_and_record
    t.optimizer.step = optimizer_step
    return t


def mixed_batch(world: int) -> dict:
    """A mixed-batch forward (one adapter per row) on the sharded QLoRA model: the logits of the whole one."""
    from minilora.train.distributed import setup
    from minilora.train.fsdp import shard_model

    model = tiny_llama(qlora=True)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        whole = model(input_ids=ids, adapter_names=names).logits
        if world > 1:
            shard_model(model, setup())
        sharded = model(input_ids=ids, adapter_names=names).logits
    return {"losses": [], "world": world, "mixed_error": (sharded - whole).abs().max().item(),
            "mixed_scale": whole.abs().max().item()}


def run_case(case: str, out: Path, world: int, rank: int) -> dict:
    record = {"losses": [], "world": world}
    if case == "mixed":
        return mixed_batch(world)
    if case.startswith("refuse="):
        t = trainer("qlora-adamw", Path(case.split("=", 1)[1]), world)
        try:
            t.train(resume=True)
            record["refused"] = None
        except RunDirectoryError as e:
            record["refused"] = str(e)
        return record
    if case == "resume":
        recorded(trainer("qlora-adamw", out, world), record, stop_after=6).train()
        resumed = recorded(trainer("qlora-adamw", out, world), record)
        resumed.train(resume=True)
        return record
    t = recorded(trainer(case, out, world), record)
    record["chunked"] = t.chunked  # the loss computed inside the head's forward, where FSDP gathers it
    nf4 = [getattr(m, name) for m in t.model.modules() if isinstance(m, Linear4bit)
           for name in ("weight", "absmax", "absmax2") if getattr(m, name) is not None]
    record["nf4_bytes_whole"] = sum(b.numel() * b.element_size() for b in nf4)  # a DTensor's numel is the whole
    record["nf4_bytes_local"] = sum(local(b).numel() * b.element_size() for b in nf4)
    record["frozen_bytes_local"] = local_bytes(t.model)
    result = t.train()
    record["val_loss_after"] = result.val_loss_after
    record["frozen_requires_grad"] = sorted(n for n, p in t.model.named_parameters()
                                            if p.requires_grad and "lora_" not in n and ".modules_to_save." not in n)
    return record


def main(out: Path, cases: list[str]) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    for case in cases:
        where = out / case.split("=")[0]
        where.mkdir(parents=True, exist_ok=True)
        record = run_case(case, where, world, rank)
        (where / f"rank{rank}.json").write_text(json.dumps(record))
    teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
