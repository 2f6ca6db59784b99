"""Many adapters on one base: mixed-batch throughput and the cost of switching.

    python benchmarks/multi_adapter.py [--repeats 9]

LLaMA-style model (hidden 256, 4 layers), LoRA r=8 on every linear layer, eval mode, batch 16 × 64.
1. Throughput of one mixed batch holding 1, 2, 4, 8, 16 distinct adapters, relative to the same
   batch with one adapter, for minilora (`adapter_names=`; stacked weights gathered per row with
   batched matmuls, and the "segments" alternative) and PEFT (its `adapter_names=`), all
   interleaved in one run (goal for minilora: ≥ 0.9 at 16).
2. set_adapter time / forward time with 2, 32 and 1,000 adapters loaded (goal ≤ 0.01, flat).
Writes benchmarks/results/multi_adapter.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from _common import RESULTS, interleaved_medians, write_results

DISTINCT = (1, 2, 4, 8, 16)


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      vocab_size=1024)
    return LlamaForCausalLM(cfg).eval()


def with_adapters(n: int):
    cfg = minilora.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    model = minilora.get_peft_model(base_model(), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def peft_with_adapters(base, n: int):
    import peft

    cfg = peft.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def switch_ratio(n: int, repeats: int, ids) -> float:
    model = with_adapters(n)
    with torch.no_grad():
        forward = statistics.median(_seconds(lambda: model(input_ids=ids)) for _ in range(repeats))
    names = [f"a{n - 1}", "a0"]
    switch = statistics.median(_seconds(lambda i=i: model.set_adapter(names[i % 2])) for i in range(20 * repeats))
    return switch / forward


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "multi_adapter")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    ids = torch.randint(0, 1024, (16, 64), generator=torch.Generator().manual_seed(0))
    ours, segments = with_adapters(16), with_adapters(16)
    segments.mixed_batch_method = "segments"
    runs = {}
    for k in DISTINCT:
        names = [f"a{i % k}" for i in range(16)]
        runs[("minilora", k)] = lambda names=names: ours(input_ids=ids, adapter_names=names)
        runs[("minilora segments", k)] = lambda names=names: segments(input_ids=ids, adapter_names=names)
    try:
        theirs = peft_with_adapters(base_model(), 16)
        for k in DISTINCT:
            names = [f"a{i % k}" for i in range(16)]
            runs[("peft", k)] = lambda names=names: theirs(input_ids=ids, adapter_names=names)
    except ImportError:
        print("peft is not installed: minilora only")
    with torch.no_grad():
        median = interleaved_medians(runs, args.repeats)
    libraries = sorted({lib for lib, _ in median})
    throughput = {lib: {k: median[(lib, 1)] / median[(lib, k)] for k in DISTINCT} for lib in libraries}
    switch = {n: switch_ratio(n, 5, ids) for n in (2, 32, 1000)}
    table = ["| distinct adapters in the batch | " + " | ".join(f"{lib} throughput (× one adapter)" for lib in libraries) + " |",
             "|---:|" + "---:|" * len(libraries)]
    for k in DISTINCT:
        table.append(f"| {k} | " + " | ".join(f"{throughput[lib][k]:.2f}" for lib in libraries) + " |")
    table += ["", "| adapters loaded | set_adapter time / forward time |", "|---:|---:|"]
    table += [f"| {n:,} | {r:.5f} |" for n, r in switch.items()]
    print(f"LLaMA-style hidden 256, 4 layers, r=8 on all linear layers, batch 16×64, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    write_results(args.out, table, {"throughput_vs_one": throughput, "switch_over_forward": switch})
    return {"throughput": throughput, "switch": switch}


if __name__ == "__main__":
    main()
