"""Peak memory of a whole `minilora finetune` job (evaluation included) at a 128k vocabulary, against
PEFT's training step on the same model, batch and adapter.

    python benchmarks/finetune_memory.py [--vocab 128256 --hidden 256 --layers 2 --batch 4 --seq 256]

The job: `minilora finetune --model M --data T --tokenizer bytes --steps 2 --batch-size 4 --seq-len 256`
with every other setting at its default (evaluation every run, at the default --eval-batch-size),
on a LLaMA-style model saved to a temporary directory and a text file of standard-library
docstrings, one per line. Peers, each in a fresh process whose peak resident set size (the kernel's
ru_maxrss) is reported:
  minilora_default     the command above: the chunked loss in training and evaluation
  minilora_no_chunked  the same with --no-chunked-loss: every logit of a batch at once, in fp32
  peft_step            PEFT on the same model with the adapter the job wrote (its adapter_config.json):
                       two training steps (transformers' loss, backward, AdamW) on 4 rows of 256 byte
                       tokens of the same text; no data loading, no evaluation, no files
Writes benchmarks/results/finetune_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from minilora.experiments.docstrings import family_docstrings
from _common import RESULTS, write_results


def peak_rss_mb(command: list[str]) -> float:
    """Run `command` to the end and return its peak resident set size in MiB (Linux: ru_maxrss in KiB)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return usage.ru_maxrss / 1024


def peft_step(model_dir: str, adapter_dir: str, data: str, batch: int, seq: int) -> None:
    """(the peft_step peer, in its own process) two training steps of PEFT with the job's adapter config."""
    import peft
    hf_logging.set_verbosity_error()
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    lora = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                           lora_dropout=config["lora_dropout"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), lora).train()
    ids = torch.tensor(list(Path(data).read_bytes()[: batch * seq]), dtype=torch.long).view(batch, seq)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lines", type=int, default=600, help="docstrings in the data file (a tenth is held out)")
    p.add_argument("--peft-step", nargs=3, metavar=("MODEL", "ADAPTER", "DATA"), help="(internal) one peer")
    p.add_argument("--out", type=Path, default=RESULTS / "finetune_memory")
    args = p.parse_args()
    if args.peft_step:
        peft_step(*args.peft_step, args.batch, args.seq)
        return
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=args.hidden // 64)
        LlamaForCausalLM(config).save_pretrained(root / "model")
        texts = [" ".join(t.split()) for family in family_docstrings().values() for t in family][: args.lines]
        (root / "data.txt").write_text("\n".join(texts) + "\n")
        job = [sys.executable, "-m", "minilora.cli", "finetune", "--model", str(root / "model"), "--data",
               str(root / "data.txt"), "--tokenizer", "bytes", "--steps", "2", "--batch-size", str(args.batch),
               "--seq-len", str(args.seq), "--no-progressbar"]
        peaks = {"minilora_default": peak_rss_mb(job + ["--out", str(root / "default")]),
                 "minilora_no_chunked": peak_rss_mb(job + ["--out", str(root / "plain"), "--no-chunked-loss"]),
                 "peft_step": peak_rss_mb([sys.executable, __file__, "--batch", str(args.batch), "--seq",
                                           str(args.seq), "--peft-step", str(root / "model"),
                                           str(root / "default" / "adapter"), str(root / "data.txt")])}
        adapter = json.loads((root / "default" / "adapter" / "adapter_config.json").read_text())
    table = [f"`minilora finetune --tokenizer bytes --steps 2 --batch-size {args.batch} --seq-len {args.seq}` (defaults "
             f"otherwise, evaluation included) on a LLaMA-style model, hidden {args.hidden}, {args.layers} layers, "
             f"vocab {args.vocab:,}; LoRA r={adapter['r']} on {len(adapter['target_modules'])} modules; CPU, fp32", "",
             "| peer | peak RSS (MiB) | × peft_step |", "|---|---:|---:|"]
    table += [f"| {peer} | {mb:.0f} | {mb / peaks['peft_step']:.2f} |" for peer, mb in peaks.items()]
    write_results(args.out, table, {"settings": vars(args), "peak_rss_mb": peaks,
                                    "ratio_to_peft_step": {k: v / peaks["peft_step"] for k, v in peaks.items()}})


if __name__ == "__main__":
    main()
