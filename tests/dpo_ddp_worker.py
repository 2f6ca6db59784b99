"""One process of a data-parallel DPO run, or the single-process reference: one of the runs
tests/ddp_worker.py makes (under torchrun, and in one process).

Both see the same global batch of 4 pairs per step; each process writes its adapter (and its last
evaluation's reward accuracy and validation loss) to OUT/rank<r>.safetensors.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from minilora.train.trainer import Trainer

from test_dpo import config, examples, gpt2, lora

GLOBAL_BATCH = 4


def train(out: Path) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model = lora(gpt2())
    files = out / f"data{rank}"  # each process writes and reads its own copy of the pairs
    files.mkdir()
    data, val = examples(files, n=16), examples(files, n=6, seed=1, name="val.jsonl")
    trainer = Trainer(model, config(steps=4, batch_size=GLOBAL_BATCH // world, eval_every=2, precompute_ref=True),
                      data, val, log=lambda line: None)
    result = trainer.train()
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state["reward_accuracy"] = torch.tensor(result.history[-1]["reward_accuracy"], dtype=torch.float64)
    state["val_loss_after"] = torch.tensor(result.val_loss_after, dtype=torch.float64)
    save_file(state, out / f"rank{rank}.safetensors")
