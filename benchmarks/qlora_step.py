"""One QLoRA training step on the CPU: minilora (NF4 + LoRA) against PEFT + bitsandbytes, and
against plain bf16 LoRA on the unquantized model (the limit: no dequantization at all).

    python benchmarks/qlora_step.py [--hidden 1024 --layers 4 --batch 4 --seq 128 --repeats 7]

A LLaMA-style model whose linear layers dominate (small vocabulary), all seven projections of every
layer adapted with r=16, bf16 weights and bf16 autocast. The QLoRA peers run eager and under
torch.compile (Inductor; compiled during the warm-up rounds; --no-compile leaves them out).
Peers run interleaved in shuffled order; medians, as ratios. Writes
benchmarks/results/qlora_step.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from minilora.quant import NF4Config, quantize_model
from _common import RESULTS, interleaved_medians, training_step, write_results
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def bnb_quantize(model) -> None:
    """Replace the projections by bitsandbytes' Linear4bit (NF4, double quant, bf16 compute)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)


def peers(args) -> dict:
    base = base_model(args)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    models = {"bf16 LoRA (minilora)": minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(**lora))}
    q = copy.deepcopy(base)
    quantize_model(q, NF4Config(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16))
    models["QLoRA (minilora)"] = minilora.get_peft_model(q, minilora.LoraConfig(**lora))
    try:
        import peft

        b = copy.deepcopy(base)
        bnb_quantize(b)
        models["QLoRA (PEFT + bitsandbytes)"] = peft.get_peft_model(b, peft.LoraConfig(**lora))
    except ImportError:
        print("peft or bitsandbytes is not installed: measured without them")
    models = {name: m.train() for name, m in models.items()}
    if args.compile:
        for name in ("QLoRA (minilora)", "QLoRA (PEFT + bitsandbytes)"):
            if name in models:
                models[f"{name} compiled"] = torch.compile(copy.deepcopy(models[name]))
    return models


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled peers")
    parser.add_argument("--out", type=Path, default=RESULTS / "qlora_step")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    models = peers(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    median = interleaved_medians({n: training_step(m, ids, torch.bfloat16) for n, m in models.items()},
                                 args.repeats, args.warmup)
    limit = median["bf16 LoRA (minilora)"]
    ratios = {f"{n} / bf16 LoRA": median[n] / limit for n in median}
    if "QLoRA (PEFT + bitsandbytes)" in median:
        ratios["speed-up of minilora QLoRA over PEFT + bitsandbytes"] = (
            median["QLoRA (PEFT + bitsandbytes)"] / median["QLoRA (minilora)"])
    compiled = ("QLoRA (minilora) compiled", "QLoRA (PEFT + bitsandbytes) compiled")
    if all(name in median for name in compiled):
        ratios["QLoRA (minilora) compiled / QLoRA (PEFT + bitsandbytes) compiled"] = median[compiled[0]] / median[compiled[1]]
    if compiled[0] in median:
        ratios["QLoRA (minilora) compiled / QLoRA (minilora)"] = median[compiled[0]] / median["QLoRA (minilora)"]
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch}×{args.seq}, r=16 on all 7 projections, "
          f"bf16 autocast, {args.repeats} repeats, {torch.get_num_threads()} threads")
    table = ["| ratio of medians | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    write_results(args.out, table, {"config": vars(args), "median_seconds": median, "ratios": ratios})
    return ratios


if __name__ == "__main__":
    main()
