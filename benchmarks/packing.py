"""Instruction tuning on real text with real lengths, padded rows against packed rows (--pack).

    python benchmarks/packing.py [--examples 256 --seq 512 --batch 8 --hidden 256 --layers 2 --repeats 3]

The examples: the standard library's docstrings as instructions and answers (the first sentence
asks, the rest answers), byte tokens, as `minilora finetune --task instruction --tokenizer bytes`
reads them. The same examples go through a LLaMA-style model with LoRA (r=16 on Q and V) twice:
padded to --seq tokens, --batch rows per step, and packed (minilora/train/packing.py) into rows of
--seq tokens, as many rows per step as hold the same number of examples on average.

Reported: examples' tokens per second of training (forward + backward over all the examples;
medians over --repeats rounds, the two layouts interleaved), the rows' fill (the share of tokens
that are examples' tokens), and the mean loss per example over the same examples in both layouts
(they must agree to 1e-5 relative). Writes benchmarks/results/packing.{json,md}.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import minilora
from minilora.experiments.docstrings import family_docstrings
from minilora.train.data import IGNORE, load_tokenizer
from minilora.train.packing import pack
from minilora.train.task import Instruction
from _common import RESULTS, interleaved_medians, write_results


def docstring_examples(n: int, seed: int, seq: int) -> list[tuple[int, dict]]:
    """(line number, {"instruction", "output"}) from standard-library docstrings of two sentences or more
    whose first sentence leaves room for an answer in `seq` byte tokens."""
    texts = [t for family in family_docstrings().values() for t in family]
    random.Random(seed).shuffle(texts)
    records = []
    for text in texts:
        first, _, rest = " ".join(text.split()).partition(". ")
        if rest and len(first) < seq // 4:
            records.append((len(records) + 1, {"instruction": first + ".", "output": rest}))
        if len(records) == n:
            break
    return records


def batches(tensors: dict, size: int) -> list[dict]:
    n = len(tensors["input_ids"])
    return [{k: v[i:i + size] for k, v in tensors.items()} for i in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    tokens = load_tokenizer(None, "bytes")
    padded = Instruction().records_to_rows("docstrings", docstring_examples(args.examples, 0, args.seq), tokens, args.seq, None)
    packed = pack(padded, args.seq, tokens.pad_id or 0)
    example_tokens = int(padded.tensors["attention_mask"].sum())
    rows_per_step = max(1, round(args.batch * len(packed) / len(padded)))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq)
    model = minilora.get_peft_model(LlamaForCausalLM(config), minilora.LoraConfig(r=16, target_modules=["q", "v"],
                                                                                   init_lora_weights=False)).train()
    task = Instruction()
    layouts = {"padded": batches(padded.tensors, args.batch), "packed": batches(packed.tensors, rows_per_step)}

    def epoch(name):
        def run():
            for batch in layouts[name]:
                task.summed_loss(model, batch, chunked=True).backward()
            model.zero_grad(set_to_none=True)
        return run

    seconds = interleaved_medians({name: epoch(name) for name in layouts}, args.repeats)
    with torch.no_grad():
        mean_loss = {name: sum(task.summed_loss(model, b, chunked=True).item() for b in layouts[name]) / len(padded)
                     for name in layouts}
    fill = {"padded": example_tokens / padded.tensors["input_ids"].numel(),
            "packed": example_tokens / packed.tensors["input_ids"].numel()}
    speed = {name: example_tokens / seconds[name] for name in layouts}
    scored = {"padded": int((padded.tensors["labels"][:, 1:] != IGNORE).sum()),
              "packed": int((packed.tensors["labels"][:, 1:] != IGNORE).sum())}
    data = {"settings": vars(args), "rows": {"padded": len(padded), "packed": len(packed)}, "fill": fill,
            "seconds_per_epoch": seconds, "tokens_per_second": speed, "mean_loss_per_example": mean_loss,
            "scored_tokens": scored}
    relative = abs(mean_loss["packed"] - mean_loss["padded"]) / abs(mean_loss["padded"])
    table = [f"Instruction tuning on {args.examples} standard-library docstrings (byte tokens), LLaMA-style hidden "
             f"{args.hidden}, {args.layers} layers, LoRA r=16 on Q and V, rows of {args.seq} tokens, fp32 on the CPU",
             "", "| layout | rows | fill | examples' tokens / s | × padded | mean loss per example |",
             "|---|---|---|---|---|---|",
             *(f"| {name} | {data['rows'][name]} | {fill[name]:.0%} | {speed[name]:,.0f} | "
               f"{speed[name] / speed['padded']:.2f} | {mean_loss[name]:.6f} |" for name in layouts),
             "", f"Mean loss per example: packed and padded differ by {relative:.1e} (relative); scored tokens "
             f"{scored['packed']:,} packed, {scored['padded']:,} padded."]
    write_results(RESULTS / "packing", table, data)


if __name__ == "__main__":
    main()
