"""Many adapters trained in one pass (train/together.py) against one run per adapter.

    python benchmarks/multi_adapter_training.py [--steps 6] [--repeats 5]

8 adapters (LoRA r=8 on Q and V), the same rows per adapter per step, on a GPT-2-style model
(6 layers × 384) and a LLaMA-style one (6 layers × 384), fp32, at three row shapes:

1. Wall time of training all 8, S steps each: one mixed run (`TogetherTrainer`, 8·b rows a step,
   each adapter's b rows) against 8 sequential runs (`Trainer`, b rows a step), both with their
   evaluations; and as plain loops (forward, backward, AdamW; no evaluation): one mixed loop
   (adapter_names=) against 8 sequential loops, minilora's and PEFT's (PEFT trains one adapter at
   a time). Goal: ≤ 0.4× the sequential wall time.
2. Step time: one mixed step of 8 adapters × b rows against one adapter's step of 8·b rows, the
   same total batch (forward + backward + AdamW; medians over interleaved repeats). Goal: ≤ 1.3×.

Writes benchmarks/results/multi_adapter_training.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from _common import RESULTS, interleaved_medians, write_results
from minilora.train import TrainConfig, Trainer
from minilora.train.data import Examples
from minilora.train.together import AdapterData, TogetherTrainer

ADAPTERS = 8
VOCAB = 8192
SHAPES = {"tiny rows (b=1, T=16)": (1, 16), "short rows (b=1, T=64)": (1, 64), "long rows (b=2, T=256)": (2, 256)}
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def base(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=VOCAB, n_positions=512)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=6, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                      num_key_value_heads=6, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg)


def lora(family: str, peft_module=minilora):
    return peft_module.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[family], lora_dropout=0.0)


def with_adapters(family: str):
    model = minilora.get_peft_model(base(family), lora(family), adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", lora(family))
    return model


def examples(seed: int, n: int, length: int) -> Examples:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, "domain")


def settings(steps: int, batch: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch, eval_every=steps, eval_batch_size=8, save_every=0,
                       progressbar=False, adapter_mix="equal")


def wall_times(family: str, rows: int, length: int, steps: int) -> dict[str, float]:
    data = {f"a{i}": AdapterData(examples(i, 4 * rows * steps, length), examples(100 + i, 8, length))
            for i in range(ADAPTERS)}
    quiet = lambda _: None  # noqa: E731
    model = with_adapters(family)
    start = time.perf_counter()
    TogetherTrainer(model, settings(steps, ADAPTERS * rows), data, log=quiet).train()
    times = {"trainer: mixed run": time.perf_counter() - start}
    model = with_adapters(family)
    start = time.perf_counter()
    for name, d in data.items():
        model.set_adapter(name)
        Trainer(model, settings(steps, rows), d.train, d.val, log=quiet).train()
    times["trainer: 8 sequential runs"] = time.perf_counter() - start
    times["loop: minilora mixed"] = mixed_loop(with_adapters(family), data, rows, steps)
    times["loop: minilora 8 sequential"] = sequential_loops(with_adapters(family), data, rows, steps)
    times["loop: peft 8 sequential"] = sequential_loops(peft_with_adapters(family), data, rows, steps)
    return times


def peft_with_adapters(family: str):
    import peft

    model = peft.get_peft_model(base(family), lora(family, peft), adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", lora(family, peft))
    return model


def sequential_loops(model, data: dict, rows: int, steps: int) -> float:
    """One adapter at a time (PEFT's only way): 8 plain loops of forward, backward, AdamW; no evaluation."""
    model.train()
    start = time.perf_counter()
    for name, d in data.items():
        model.set_adapter(name)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for step in range(steps):
            ids = d.train.tensors["input_ids"][step * rows:(step + 1) * rows]
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def mixed_loop(model, data: dict, rows: int, steps: int) -> float:
    """All 8 in one plain loop: each step b rows of every adapter as one mixed batch (adapter_names=)."""
    model.train()
    model.set_requires_grad(list(data), True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    names = [name for name in data for _ in range(rows)]
    start = time.perf_counter()
    for step in range(steps):
        ids = torch.cat([d.train.tensors["input_ids"][step * rows:(step + 1) * rows] for d in data.values()])
        model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_times(family: str, rows: int, length: int, repeats: int) -> dict[str, float]:
    model = with_adapters(family).train()
    model.set_requires_grad([f"a{i}" for i in range(ADAPTERS)], True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = examples(0, ADAPTERS * rows, length).tensors["input_ids"]
    names = [f"a{i}" for i in range(ADAPTERS) for _ in range(rows)]

    def step(**kwargs):
        def run():
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    return interleaved_medians({"mixed: 8 adapters": step(adapter_names=names), "one adapter": step()}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(torch.get_num_threads())
    table = ["| model | rows | trainer: mixed run × 8 sequential runs (wall) | plain loops: mixed × 8 sequential "
             "(wall) | PEFT's 8 sequential loops × minilora's | mixed step × one adapter's step, same total batch |",
             "|---|---|---:|---:|---:|---:|"]
    data = {"steps": args.steps, "repeats": args.repeats, "adapters": ADAPTERS, "runs": {}}
    for family in ("gpt2", "llama"):
        for shape, (rows, length) in SHAPES.items():
            wall = wall_times(family, rows, length, args.steps)
            steps = step_times(family, rows, length, args.repeats)
            ratios = {"trainer": wall["trainer: mixed run"] / wall["trainer: 8 sequential runs"],
                      "loops": wall["loop: minilora mixed"] / wall["loop: minilora 8 sequential"],
                      "peft_loops": wall["loop: peft 8 sequential"] / wall["loop: minilora 8 sequential"],
                      "step": steps["mixed: 8 adapters"] / steps["one adapter"]}
            data["runs"][f"{family}, {shape}"] = {"wall_seconds": wall, "step_seconds": steps, "ratios": ratios}
            table.append(f"| {family} 6 × 384 | {shape} | {ratios['trainer']:.2f} | {ratios['loops']:.2f} | "
                         f"{ratios['peft_loops']:.2f} | {ratios['step']:.2f} |")
    write_results(RESULTS / "multi_adapter_training", table, data)


if __name__ == "__main__":
    main()
