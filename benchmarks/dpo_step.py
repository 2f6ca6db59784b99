"""One DPO step (forward, backward, AdamW) of a LLaMA-style model with LoRA: where the reference comes from.

    python benchmarks/dpo_step.py [--hidden 1024 --layers 4 --vocab 32000 --pairs 2 --seq 128 --r 16 --repeats 5]

Peers, all measured in the same run:
  disabled_adapter  minilora's reference: the same model inside disable_adapter(), under no_grad
  chunked           disabled_adapter with the chunked log-probs (minilora/train/chunked_loss.py, the
                    trainer's default): no (S·T, V) logits in either pass
  frozen_copy       a second frozen copy of the base as the reference (what TRL does for a model it
                    does not recognise as PEFT's)
  mixed_batch       policy and reference rows in one forward pass (adapter_names with "__base__"
                    rows; each adapter's rows on its own path, which lets gradients reach it),
                    reference rows detached
  precomputed       the reference log-probs read from a table computed before training (the step
                    runs the policy only; the table costs one forward pass per pair, once)
  adapter_copy      alignment after SFT (train/reference.py): the reference is a fine-tuned adapter
                    "sft" (reference="adapter:sft"), the policy a trainable copy of it; chunked
  adapter_stack     the same reference, the policy a new adapter acting on top of "sft"; chunked
  adapter_mixed     adapter_copy with reference_pass="mixed": the policy's rows and the reference's in
                    one forward pass (adapter_names=), the reference's detached; chunked
  *_checkpointed    chunked and frozen_copy with activation checkpointing on the policy's pass (the
                    trainer's --gradient-checkpointing): each layer keeps its input only

Step time: medians over --repeats rounds, the peers interleaved in a new shuffled order each round,
all in this process. Peak memory: each peer in a fresh process (`--memory PEER`), which builds its
models, takes two steps and reports its peak resident set size (VmHWM) and how far it rose above
the process's size after its imports (the memory the step itself needs: model copies, activations,
optimizer state; and also what the process's first steps page in of torch's own code and what the
allocator keeps, the same for every peer). Then, in the same process, a third step's tensors counted
storage by storage (fsdp_memory.LiveBytes: the peer's models, optimizer state and batch, plus the
most bytes the step holds at once), which leaves out that common part. Prints ratios to frozen_copy
and writes benchmarks/results/dpo_step.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from minilora.train import reference as reference_policy
from minilora.train.trainer import enable_checkpointing
from minilora.train.data import IGNORE
from minilora.train.loss import dpo_loss
from minilora.train.preference import mixed_logps as preference_mixed_logps, reference_logps, sequence_logps
from _common import RESULTS, interleaved_medians, rss_mb, write_results
from fsdp_memory import LiveBytes

PEERS = ("disabled_adapter", "chunked", "frozen_copy", "mixed_batch", "precomputed", "adapter_copy", "adapter_stack",
         "adapter_mixed", "chunked_checkpointed", "frozen_copy_checkpointed")
BETA = 0.1


def base_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                        num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq))


def pairs(args) -> dict[str, torch.Tensor]:
    """P random pairs, (P, 2, T); the first half of each row is the prompt, the second the answer."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.pairs, 2, args.seq), generator=g)
    ids[:, 1, : args.seq // 2] = ids[:, 0, : args.seq // 2]  # one prompt per pair
    labels = ids.clone()
    labels[:, :, : args.seq // 2] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def mixed_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy (P, 2), reference (P, 2)) log-probs from one forward pass over 2S rows."""
    n = batch["input_ids"].shape[0]
    ids = batch["input_ids"].flatten(0, 1).repeat(2, 1)  # (2S, T): policy rows, then reference rows
    mask = batch["attention_mask"].flatten(0, 1).repeat(2, 1)
    targets = F.pad(batch["labels"].flatten(0, 1)[:, 1:], (0, 1), value=IGNORE).repeat(2, 1)  # (2S, T)
    names = ["default"] * (2 * n) + ["__base__"] * (2 * n)
    logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits  # (2S, T, V)
    logps = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    policy, reference = logps.view(2, n, 2, -1).sum(-1)  # (P, 2) each
    return policy, reference.detach()


def build(peer: str, args):
    """The step function of one peer (and the models it holds, kept alive by the closure)."""
    checkpointed = peer.endswith("_checkpointed")
    peer = peer.removesuffix("_checkpointed")
    base = base_model(args)
    reference = copy.deepcopy(base).requires_grad_(False).eval() if peer == "frozen_copy" else None
    sft = peer.startswith("adapter_")
    model = minilora.get_peft_model(base, minilora.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                              target_modules=["q", "k", "v", "o"]),
                                    "sft" if sft else "default")
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference (or: the SFT adapter)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    if sft:  # the policy beside the frozen SFT adapter, as the trainer sets it up
        reference_policy.set_up(model, "adapter:sft", "copy" if peer == "adapter_mixed" else peer.removeprefix("adapter_"))
    if checkpointed:
        enable_checkpointing(model.train())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = pairs(args)
    table = reference_logps(model, batch)[0] if peer == "precomputed" else None
    if peer == "mixed_batch":
        model.eval()  # the reference rows without dropout (there is none here anyway)

    def step() -> float:
        if peer == "mixed_batch":
            policy, ref = mixed_logps(model, batch)
        elif peer == "adapter_mixed":
            (policy, _), (ref, _) = preference_mixed_logps(model.train(), batch, "adapter:sft", chunked=True)
        else:
            chunked = peer == "chunked" or sft
            if peer in ("disabled_adapter", "chunked") or sft:  # the reference first, as the trainer does (its
                ref = reference_logps(model, batch, chunked=chunked,  # memory is free again)
                                      policy="adapter:sft" if sft else "base")[0]
            elif peer == "frozen_copy":
                with torch.no_grad():
                    ref = sequence_logps(reference, batch)[0]
            else:
                ref = table
            policy = sequence_logps(model, batch, chunked=chunked)[0]
        loss = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], BETA).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    held = [model, optimizer, batch, table, reference]
    return step, model, held


def counted_bytes(held: list) -> list[torch.Tensor]:
    """The tensors a peer keeps between steps: its models' weights, optimizer state, batch, table."""
    tensors = []
    for item in held:
        if isinstance(item, torch.nn.Module):
            tensors += [*item.parameters(), *item.buffers()]
        elif isinstance(item, torch.optim.Optimizer):
            tensors += [t for state in item.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        elif isinstance(item, dict):
            tensors += list(item.values())
        elif isinstance(item, torch.Tensor):
            tensors.append(item)
    return tensors


def measure_memory(peer: str, args) -> None:
    """In a fresh process: peak RSS of building one peer and taking two steps, printed as JSON."""
    before = rss_mb("VmRSS")
    step, _, held = build(peer, args)
    losses = [step(), step()]
    peak_rss = rss_mb("VmHWM")
    with LiveBytes(counted_bytes(held)) as live:  # a third step, its tensors counted storage by storage
        step()
    print(json.dumps({"peer": peer, "peak_rss_mb": peak_rss, "after_imports_mb": before,
                      "step_mb": peak_rss - before, "counted_mb": live.peak / 2**20, "losses": losses}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2 sequences each)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", choices=PEERS, help="(internal) measure one peer's peak memory and exit")
    p.add_argument("--out", type=Path, default=RESULTS / "dpo_step")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    if args.memory:
        measure_memory(args.memory, args)
        return

    flags = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "pairs", "seq", "r")]
    memory = {}
    for peer in PEERS:
        done = subprocess.run([sys.executable, __file__, "--memory", peer, *flags], capture_output=True, text=True,
                              check=True)
        memory[peer] = json.loads(done.stdout.strip().splitlines()[-1])
    steps = {peer: build(peer, args) for peer in PEERS}
    adapter = {peer: [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
               for peer, (_, model, _) in steps.items()}
    first = {peer: fn() for peer, (fn, _, _) in steps.items()}  # the same loss from every way of getting the reference
    for peer, (_, model, _) in steps.items():  # and every way trains the adapter
        after = [p for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
        assert all(not torch.equal(a, b) for a, b in zip(adapter[peer], after)), f"{peer}: the adapter did not train"
    times = interleaved_medians({peer: fn for peer, (fn, _, _) in steps.items()}, repeats=args.repeats)

    peer0 = "frozen_copy"
    table = [f"One DPO step, LLaMA-style hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r={args.r} "
             f"on q, k, v, o; {args.pairs} pairs of {args.seq} tokens; CPU, fp32; medians of {args.repeats}.", "",
             "| reference | step time (× frozen_copy) | step time (× chunked) | peak RSS MB "
             "| step memory MB (× frozen_copy) | counted MB (× frozen_copy) | first loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for peer in PEERS:
        m = memory[peer]
        table.append(f"| {peer} | {times[peer] / times[peer0]:.2f} | {times[peer] / times['chunked']:.2f} "
                     f"| {m['peak_rss_mb']:.0f} | {m['step_mb']:.0f} "
                     f"({m['step_mb'] / memory[peer0]['step_mb']:.2f}) | {m['counted_mb']:.0f} "
                     f"({m['counted_mb'] / memory[peer0]['counted_mb']:.2f}) | {first[peer]:.6f} |")
    write_results(args.out, table, {"settings": vars(args), "seconds": times, "memory": memory, "first_loss": first,
                                    "time_ratio_to_frozen_copy": {k: times[k] / times[peer0] for k in PEERS},
                                    "step_memory_ratio_to_frozen_copy": {
                                        k: memory[k]["step_mb"] / memory[peer0]["step_mb"] for k in PEERS},
                                    "counted_memory_ratio_to_frozen_copy": {
                                        k: memory[k]["counted_mb"] / memory[peer0]["counted_mb"] for k in PEERS}})


if __name__ == "__main__":
    main()
