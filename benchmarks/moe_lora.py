"""LoRA on mixture-of-experts weights: what one training step costs as the experts multiply.

    python benchmarks/moe_lora.py [--hidden 512 --intermediate 1024 --experts 8 32 64 --rows 4 --seq 256 --r 16]

A Mixtral-style and a Qwen3-MoE-style model from transformers configs (2 layers, top-2 routing, a
1,024-entry vocabulary so the experts dominate), LoRA r=16 on every expert's gate_up_proj and
down_proj (and nothing else). Peers, measured in the same run on the same model and batch:
  frozen_base     no adapter; the backward pass runs through every layer to the input embeddings
                  (the least any adapter's step can cost)
  peft            PEFT's `target_parameters`: ΔW = s·B·A formed for every expert in each forward
  minilora_delta  minilora's dense route (LoraExperts.dense_delta_forward): the same dense ΔW for
                  every expert, handed to the experts' own forward (`torch.func.functional_call`);
                  what minilora did before the routed route, kept as a named baseline
  minilora        minilora's default, the routed route (minilora/routed.py): each expert's low-rank
                  terms on the tokens routed to it, grouped matmuls, no ΔW

Step: forward + backward of the mean next-token loss on rows × seq tokens; time is the median over
--repeats interleaved rounds; peak memory is counted storage by storage (fsdp_memory.LiveBytes),
the model's own parameters left out. Both adapters start from the same factors (B not zero), and
the run checks that they give the same loss (1e-5 relative). Writes
benchmarks/results/moe_lora.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from pathlib import Path

import peft
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from minilora import routed
from _common import RESULTS, interleaved_medians, write_results
from fsdp_memory import LiveBytes

VOCAB = 1024
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def base(kind: str, experts: int, hidden: int, intermediate: int):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=hidden // 64,
                  num_key_value_heads=hidden // 64, num_experts_per_tok=2, max_position_embeddings=4096)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts))
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=64, intermediate_size=intermediate,
                                              moe_intermediate_size=intermediate, num_experts=experts,
                                              decoder_sparse_step=1, mlp_only_layers=[]))


def peers(kind: str, experts: int, args) -> dict:
    frozen = base(kind, experts, args.hidden, args.intermediate).requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)  # something for the backward pass to reach
    lora = dict(r=args.r, lora_alpha=2 * args.r, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(base(kind, experts, args.hidden, args.intermediate), peft.LoraConfig(**lora))
    ours = minilora.get_peft_model(base(kind, experts, args.hidden, args.intermediate), minilora.LoraConfig(**lora))
    minilora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))  # the same factors
    return {"frozen_base": frozen, "peft": theirs.train(), "minilora_delta": ours.train(), "minilora": ours}


def step(model, ids: torch.Tensor, dense: bool = False):
    def run() -> float:
        with dense_route(dense):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()
    return run


@contextlib.contextmanager
def dense_route(on: bool):
    """With `on`, LoraExperts takes its dense ΔW route (routed.understands says no to every module)."""
    understands = routed.understands
    if on:
        routed.understands = lambda experts: False
    try:
        yield
    finally:
        routed.understands = understands


def peak_step_bytes(model, run) -> int:
    gc.collect()
    with LiveBytes(list(model.parameters()) + list(model.buffers())) as live:
        resident = live.now()
        run()
    return live.peak - resident


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--kinds", nargs="+", default=["mixtral", "qwen3_moe"])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "moe_lora")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    ids = torch.randint(0, VOCAB, (args.rows, args.seq), generator=torch.Generator().manual_seed(1))
    rows, data = [], {"settings": vars(args), "results": {}}
    for kind in args.kinds:
        for experts in args.experts:
            models = peers(kind, experts, args)
            runs = {name: step(model, ids, dense=name == "minilora_delta") for name, model in models.items()}
            losses = {name: run() for name, run in runs.items()}
            for name in ("minilora_delta", "minilora"):
                gap = abs(losses[name] - losses["peft"]) / abs(losses["peft"])
                assert gap < 1e-5, f"{kind}, {experts} experts: {name}'s loss {losses[name]} vs PEFT's {losses['peft']}"
            memory = {name: peak_step_bytes(models[name], run) for name, run in runs.items()}
            seconds = interleaved_medians(runs, args.repeats)
            data["results"][f"{kind}/{experts}"] = {"seconds": seconds, "peak_step_bytes": memory, "loss": losses}
            for name in runs:
                rows.append(f"| {kind} | {experts} | {name} | {seconds[name]:.3f} | "
                            f"{seconds[name] / seconds['frozen_base']:.2f} | {seconds[name] / seconds['peft']:.2f} | "
                            f"{memory[name] / 2**20:.0f} | {memory[name] / memory['frozen_base']:.2f} |")
            del models, runs
    table = [f"One training step, hidden {args.hidden}, expert intermediate {args.intermediate}, 2 layers, top-2, "
             f"{args.rows} × {args.seq} tokens, LoRA r={args.r} on every expert's gate_up_proj and down_proj; "
             f"fp32 on the CPU, medians of {args.repeats}", "",
             "| model | experts | peer | step (s) | × frozen base | × PEFT | peak step memory (MiB) | × frozen base |",
             "|---|---|---|---|---|---|---|---|", *rows]
    write_results(args.out, table, data)


if __name__ == "__main__":
    main()
