"""One LoRA training step of a LLaMA-style model at today's vocabulary sizes: where the logits go.

    python benchmarks/loss_memory.py [--hidden 512 --layers 4 --rows 4 --seq 512 --r 16 --repeats 3]

Peers, all measured in the same run on the same model, batch and adapter (r=16 on every linear
layer but the head, B not zero):
  peft              PEFT's model and transformers' own loss (`model(input_ids, labels=...).loss`)
  minilora_plain    minilora's model and its plain loss (every logit at once, in fp32)
  minilora_chunked  minilora's model and the chunked loss (minilora/train/chunked_loss.py)

With --checkpointing-seq T (2,048 by default; 0 skips it), a second table: minilora chunked at vocab
128,256 on rows of T tokens, without and with activation checkpointing (TrainConfig.gradient_checkpointing:
the model's own gradient_checkpointing_enable, non-reentrant), same memory and time measures.

Peak step memory: the most bytes of tensor storage alive at once during one forward + backward,
counted storage by storage by a dispatch mode (fsdp_memory.LiveBytes; not RSS, which the allocator's
caching blurs), minus the model's own parameters and buffers. Step time: medians over --repeats
rounds, the peers interleaved in a new order each round. Writes benchmarks/results/loss_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import gc

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from minilora.train.task import Domain
from minilora.train.trainer import enable_checkpointing
from _common import RESULTS, interleaved_medians, write_results
from fsdp_memory import LiveBytes

VOCABS = (32000, 128256, 151936)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model(library, vocab: int, hidden: int, layers: int, r: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    lora = library.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    return library.get_peft_model(LlamaForCausalLM(config), lora).train()


def steps(models: dict, ids: torch.Tensor) -> dict:
    """One forward + backward per peer, gradients cleared after."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    n_tokens = ids[:, 1:].numel()

    def peft_step():
        models["peft"](**batch).loss.backward()
        models["peft"].zero_grad(set_to_none=True)

    def minilora_step(chunked: bool):
        def run():
            (Domain().summed_loss(models["minilora"], batch, chunked=chunked) / n_tokens).backward()
            models["minilora"].zero_grad(set_to_none=True)
        return run

    return {"peft": peft_step, "minilora_plain": minilora_step(False), "minilora_chunked": minilora_step(True)}


def peak_step_bytes(model_, run) -> int:
    resident = list(model_.parameters()) + list(model_.buffers())
    gc.collect()
    with LiveBytes(resident) as live:
        base = live.now()
        run()
    return live.peak - base


def checkpointing_rows(args) -> tuple[list[str], dict]:
    """Rows of the checkpointing table: minilora chunked without and with activation checkpointing."""
    vocab, seq = 128256, args.checkpointing_seq
    lora_model = model(minilora, vocab, args.hidden, args.layers, args.r)
    hf = lora_model.get_base_model()
    ids = torch.randint(0, vocab, (args.rows, seq), generator=torch.Generator().manual_seed(1))
    chunked = steps({"minilora": lora_model}, ids)["minilora_chunked"]

    def step(checkpointing: bool):
        def run():
            if checkpointing:
                enable_checkpointing(lora_model)
            else:
                (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
            chunked()
        return run

    runs = {"without": step(False), "with": step(True)}
    memory = {name: peak_step_bytes(lora_model, run) for name, run in runs.items()}
    seconds = interleaved_medians(runs, args.repeats)
    rows = [f"| {name} | {memory[name] / 2**30:.2f} | {memory[name] / memory['without']:.2f} | {seconds[name]:.2f} | "
            f"{seconds[name] / seconds['without']:.2f} |" for name in runs]
    return rows, {"vocab": vocab, "seq": seq, "peak_step_bytes": memory, "step_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--checkpointing-seq", type=int, default=2048)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(torch.get_num_threads())
    rows, data = [], {"settings": vars(args), "results": {}}
    for vocab in args.vocabs:
        models = {"peft": model(peft, vocab, args.hidden, args.layers, args.r),
                  "minilora": model(minilora, vocab, args.hidden, args.layers, args.r)}
        ids = torch.randint(0, vocab, (args.rows, args.seq), generator=torch.Generator().manual_seed(1))
        runs = steps(models, ids)
        owner = {"peft": models["peft"], "minilora_plain": models["minilora"], "minilora_chunked": models["minilora"]}
        memory = {name: peak_step_bytes(owner[name], run) for name, run in runs.items()}
        seconds = interleaved_medians(runs, args.repeats)
        data["results"][vocab] = {"peak_step_bytes": memory, "step_seconds": seconds}
        for name in runs:
            rows.append(f"| {vocab:,} | {name} | {memory[name] / 2**30:.2f} | {memory[name] / memory['peft']:.2f} | "
                        f"{seconds[name]:.2f} | {seconds[name] / seconds['peft']:.2f} |")
        del models, runs, owner
    table = [f"One step, LLaMA-style hidden {args.hidden}, {args.layers} layers, LoRA r={args.r} on every linear "
             f"layer, {args.rows} × {args.seq} tokens, fp32 on the CPU",
             "", "| vocabulary | peer | peak step memory (GiB) | × PEFT | step (s) | × PEFT |", "|---|---|---|---|---|---|",
             *rows]
    if args.checkpointing_seq:
        rows, data["checkpointing"] = checkpointing_rows(args)
        table += ["", f"Activation checkpointing: minilora chunked, vocab 128,256, {args.rows} × {args.checkpointing_seq} "
                  "tokens, the same model", "", "| activation checkpointing | peak step memory (GiB) | × without | "
                  "step (s) | × without |", "|---|---|---|---|---|", *rows]
    write_results(RESULTS / "loss_memory", table, data)


if __name__ == "__main__":
    main()
