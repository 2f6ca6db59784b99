"""Switching adapters under torch.compile: graphs compiled, time per switch, outputs.

    python benchmarks/hotswap.py [--hidden 512 --layers 4 --vocab 32000 --rows 4 --seq 128 --adapters 10
                                  --switches 20 --backend inductor]

A LLaMA-style model from a transformers config and `--adapters` LoRA adapters on q, k, v and o
(ranks 4 to 16, different alphas, B not zero), saved in PEFT's format. None uses rsLoRA: PEFT's
hotswap_adapter refuses to swap between rsLoRA and plain adapters (minilora's tests swap both).
Each peer is compiled once, then runs `--switches` switches in a fixed shuffled order across the
adapters, a forward pass after each:
  minilora_unprepared   set_adapter on the compiled model as it is: dynamo compiles a graph per
                        adapter (these graphs are the "fresh compile of each adapter" outputs are
                        compared with)
  minilora_set_adapter  prepare_model_for_compiled_hotswap(model, target_rank=16), then set_adapter
                        among the adapters loaded: one slot index written in place
  minilora_from_file    the same preparation with one adapter, then load_adapter(dir, "default",
                        hotswap=True): the file read and copied into the slot
  peft_from_state_dict  PEFT's prepare_model_for_compiled_hotswap and hotswap_adapter_from_state_dict
                        (state dicts read beforehand): PEFT's switch in memory
  peft_from_file        PEFT's hotswap_adapter(model, dir, "default")
Graphs are dynamo's count (torch._dynamo.utils.counters["stats"]["unique_graphs"]) from the
first compiled call on. A switch is timed alone (the median over the switches); a forward is the
median of the forwards after the switches. Every forward is compared with the eager model that
holds the adapter the plain way and with the unprepared model's graph of that adapter. The same run
then sends mixed batches (adapter_names, one adapter or "__base__" per row, a different list each
call) through the prepared model and counts the graphs they add. Writes benchmarks/results/hotswap.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
from peft.utils import hotswap as peft_hotswap
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from _common import RESULTS, write_results

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = [4, 6, 8, 10, 12, 14, 16, 4, 8, 16]


def base(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def adapter_config(k: int) -> minilora.LoraConfig:
    r = RANKS[k % len(RANKS)]
    return minilora.LoraConfig(r=r, lora_alpha=2 * r + k, target_modules=TARGETS, init_lora_weights=False)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def fresh_count() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def run_switches(switch, forward, order: list[int], expected: dict) -> dict:
    """Time each switch alone; run a forward after each and compare it with `expected[name]`s."""
    switch_s, worst = [], {}
    for k in order:
        start = time.perf_counter()
        switch(k)
        switch_s.append(time.perf_counter() - start)
        with torch.no_grad():
            logits = forward()
        for what, outputs in expected.items():
            worst[what] = max(worst.get(what, 0.0), (logits - outputs[k]).abs().max().item())
    forward_s = []
    for _ in range(max(5, len(order) // 4)):
        start = time.perf_counter()
        with torch.no_grad():
            forward()
        forward_s.append(time.perf_counter() - start)
    return dict(graphs=graphs(), switch_s=statistics.median(switch_s), forward_s=statistics.median(forward_s),
                max_diff=worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--out", type=Path, default=RESULTS / "hotswap")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.recompile_limit = 4 * args.adapters  # the unprepared peer compiles one graph per adapter
    names = [f"adapter{k}" for k in range(args.adapters)]
    ids = torch.randint(0, args.vocab, (args.rows, args.seq), generator=torch.Generator().manual_seed(1))
    order = [k % args.adapters for k in range(args.switches)]
    random.Random(0).shuffle(order)
    folder = Path(tempfile.mkdtemp())
    dirs = [folder / name for name in names]

    # every adapter, saved; the eager outputs and the unprepared model's graph per adapter
    model = None
    for k, name in enumerate(names):
        torch.manual_seed(100 + k)
        if model is None:
            model = minilora.get_peft_model(base(args), adapter_config(k), name)
        else:
            model.add_adapter(name, adapter_config(k))
    model.eval().save_pretrained(folder)
    eager = {}
    with torch.no_grad():
        for k, name in enumerate(names):
            model.set_adapter(name)
            eager[k] = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    fresh_count()
    compiled = torch.compile(model, backend=args.backend)
    fresh = {}
    with torch.no_grad():
        for k, name in enumerate(names):
            model.set_adapter(name)
            fresh[k] = compiled(input_ids=ids).logits
    results = {"minilora_unprepared": run_switches(lambda k: model.set_adapter(names[k]),
                                                   lambda: compiled(input_ids=ids).logits, order,
                                                   {"eager": eager, "fresh_compile": fresh})}
    expected = {"eager": eager, "fresh_compile": fresh}

    # minilora, prepared, switching among the adapters it holds
    minilora.prepare_model_for_compiled_hotswap(model, target_rank=max(RANKS))
    fresh_count()
    model.compile(backend=args.backend)
    with torch.no_grad():
        model(input_ids=ids)
    results["minilora_set_adapter"] = run_switches(lambda k: model.set_adapter(names[k]),
                                                   lambda: model(input_ids=ids).logits, order, expected)
    mixed_before, worst, rng = graphs(), 0.0, random.Random(1)
    with torch.no_grad():
        for _ in range(args.switches):
            rows = [rng.choice(names + ["__base__"]) for _ in range(args.rows)]
            logits = model(input_ids=ids, adapter_names=rows).logits
            for i, row in enumerate(rows):
                expected_row = base_logits[i] if row == "__base__" else eager[names.index(row)][i]
                worst = max(worst, (logits[i] - expected_row).abs().max().item())
    results["minilora_set_adapter"]["max_diff"]["mixed_rows"] = worst
    results["minilora_set_adapter"]["mixed_batch_graphs"] = graphs() - mixed_before

    # minilora, prepared with one adapter, replacing it from files
    one = minilora.PeftModel.from_pretrained(base(args), dirs[0]).eval()
    minilora.prepare_model_for_compiled_hotswap(one, target_rank=max(RANKS))
    fresh_count()
    one.compile(backend=args.backend)
    with torch.no_grad():
        one(input_ids=ids)
    results["minilora_from_file"] = run_switches(lambda k: one.load_adapter(dirs[k], "default", hotswap=True),
                                                 lambda: one(input_ids=ids).logits, order, expected)

    # PEFT, prepared with one adapter, hotswapping from state dicts and from files
    theirs = peft.PeftModel.from_pretrained(base(args), str(dirs[0])).eval()
    peft_hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=max(RANKS))
    states = [peft_hotswap._insert_adapter_name_into_state_dict(peft.load_peft_weights(str(d)), adapter_name="default",
                                                                 parameter_prefix="lora_") for d in dirs]  # as hotswap_adapter does
    configs = [peft.LoraConfig.from_pretrained(str(d)) for d in dirs]
    fresh_count()
    peft_compiled = torch.compile(theirs, backend=args.backend)
    with torch.no_grad():
        peft_compiled(input_ids=ids)

    def from_state_dict(k: int) -> None:
        peft_hotswap.hotswap_adapter_from_state_dict(theirs, states[k], "default", configs[k])
    results["peft_from_state_dict"] = run_switches(from_state_dict, lambda: peft_compiled(input_ids=ids).logits,
                                                   order, expected)
    results["peft_from_file"] = run_switches(
        lambda k: peft_hotswap.hotswap_adapter(theirs, str(dirs[k]), "default"),
        lambda: peft_compiled(input_ids=ids).logits, order, expected)

    table = [f"Compiled hotswap: LLaMA-style, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
             f"{args.rows} × {args.seq} tokens, {args.adapters} adapters (ranks 4-16) on {', '.join(TARGETS)}, "
             f"{args.switches} switches, backend {args.backend}; medians", "",
             "| peer | graphs | switch (ms) | forward (ms) | switch / forward | max abs diff vs eager | "
             "vs fresh compile |", "|---|---|---|---|---|---|---|"]
    for peer, r in results.items():
        table.append(f"| {peer} | {r['graphs']} | {r['switch_s'] * 1e3:.3f} | {r['forward_s'] * 1e3:.1f} | "
                     f"{r['switch_s'] / r['forward_s']:.2%} | {r['max_diff']['eager']:.1e} | "
                     f"{r['max_diff']['fresh_compile']:.1e} |")
    ours = results["minilora_set_adapter"]
    table += ["", f"Mixed batches on the prepared model ({args.switches} calls, a different adapter or __base__ per "
              f"row each call): {ours['mixed_batch_graphs']} graph(s) added, max abs diff vs eager "
              f"{ours['max_diff']['mixed_rows']:.1e}."]
    write_results(args.out, table, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
