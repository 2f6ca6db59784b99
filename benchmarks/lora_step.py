"""One training step (forward + backward) of a GPT-2-style model: frozen base vs LoRA variants.

    python benchmarks/lora_step.py [--layers 6 --width 384 --batch 8 --seq 128 --vocab 8192 --repeats 15]

Peers, all measured in the same run, interleaved in a shuffled order every repeat:
  base        the frozen model; the embedding output requires grad, so backward walks every layer
              (the least work any LoRA on every layer must do)
  minilora    LoRA r=8 on c_attn (whole fused QKV output), every layer
  minilora_qv LoRA r=8 on the Q and V slices of c_attn, every layer
  peft        PEFT's LoRA r=8 on c_attn, every layer
  minilora_dora, peft_dora   DoRA r=8 on c_attn, every layer (--no-dora leaves them out)
  minilora compiled, minilora_qv compiled, peft compiled, minilora_dora compiled, peft_dora compiled
              the same models under torch.compile (Inductor), compiled during the warm-up rounds
              (--no-compile leaves them out)
Prints medians as ratios and writes benchmarks/results/lora_step.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import minilora
from _common import RESULTS, interleaved_medians, training_step, write_results


def build(args) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=args.vocab,
                     n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def peers(args) -> dict[str, torch.nn.Module]:
    base = build(args)
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.transformer.wte.register_forward_hook(lambda m, i, out: out.requires_grad_())
    cfg = dict(r=8, lora_alpha=16, lora_dropout=0.0)
    models = {
        "base": frozen,
        "minilora": minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(target_modules=["c_attn"], **cfg)),
        "minilora_qv": minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(target_modules=["q", "v"], **cfg)),
    }
    if args.dora:
        models["minilora_dora"] = minilora.get_peft_model(copy.deepcopy(base), minilora.LoraConfig(
            target_modules=["c_attn"], use_dora=True, **cfg))
    try:
        import peft

        models["peft"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["c_attn"], **cfg))
        if args.dora:
            models["peft_dora"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                target_modules=["c_attn"], use_dora=True, **cfg))
    except ImportError:
        print("peft is not installed: measuring without it")
    models = {name: m.train() for name, m in models.items()}
    if args.compile:
        for name in ("minilora", "minilora_qv", "peft", "minilora_dora", "peft_dora"):
            if name in models:
                models[f"{name} compiled"] = torch.compile(copy.deepcopy(models[name]))
    return models


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192, help="GPT-2's own is 50257; a big head hides LoRA's cost")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled peers")
    parser.add_argument("--no-dora", dest="dora", action="store_false", help="leave out the DoRA peers")
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_step")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    models = peers(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    median = interleaved_medians({n: training_step(m, ids) for n, m in models.items()}, args.repeats, args.warmup)
    ratios = {f"{name} / base": median[name] / median["base"] for name in median if name != "base"}
    for suffix in ("", " compiled"):
        if f"peft{suffix}" in median:
            for ours in ("minilora", "minilora_qv"):
                ratios[f"{ours}{suffix} / peft{suffix}"] = median[f"{ours}{suffix}"] / median[f"peft{suffix}"]
    for suffix in ("", " compiled"):
        for peer in ("minilora", "peft_dora"):
            ours, theirs = f"minilora_dora{suffix}", f"{peer}{suffix}"
            if ours in median and theirs in median:
                ratios[f"{ours} / {theirs}"] = median[ours] / median[theirs]
    for ours in ("minilora", "minilora_qv", "peft", "minilora_dora", "peft_dora"):
        if f"{ours} compiled" in median:
            ratios[f"{ours} compiled / {ours}"] = median[f"{ours} compiled"] / median[ours]
    print(f"{args.layers} layers × {args.width} wide, batch {args.batch}×{args.seq}, vocab {args.vocab}, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads")
    table = ["| ratio of medians | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    write_results(args.out, table, {"config": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                    "median_seconds": median, "ratios": ratios})
    return ratios


if __name__ == "__main__":
    main()
