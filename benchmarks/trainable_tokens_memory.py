"""Peak memory of a training step with trainable tokens at a real vocabulary: minilora against PEFT.

    python benchmarks/trainable_tokens_memory.py [--vocab 128000 --tokens 2048 --width 256]

A one-layer GPT-2 whose head is tied to its embeddings, LoRA on c_attn and three trainable tokens;
each library runs one forward + backward in a fresh process, which reports its peak resident memory
above the wrapped model's (ru_maxrss). Writes benchmarks/results/trainable_tokens_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import RESULTS, write_results

PROBE = r"""
import json, resource, sys, warnings
import torch
from transformers import GPT2Config, GPT2LMHeadModel
warnings.simplefilter("ignore")
library, vocab, tokens, width = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=1, n_head=4, n_positions=tokens))
ids = torch.randint(0, vocab, (1, tokens))
if library == "peft":
    import peft as lib
else:
    import minilora as lib
wrapped = lib.get_peft_model(model, lib.LoraConfig(r=4, target_modules=["c_attn"], trainable_token_indices=[1, 2, 3]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
wrapped(input_ids=ids, labels=ids).loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"model_mb": before / 1024, "step_peak_above_model_mb": (after - before) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    rows = {}
    for library in ("minilora", "peft"):
        done = subprocess.run([sys.executable, "-c", PROBE, library, str(args.vocab), str(args.tokens), str(args.width)],
                              capture_output=True, text=True, check=True)
        rows[library] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = rows["minilora"]["step_peak_above_model_mb"] / rows["peft"]["step_peak_above_model_mb"]
    table = ["| library | step peak above the model (MB) |", "|---|---:|",
             *(f"| {k} | {v['step_peak_above_model_mb']:.0f} |" for k, v in rows.items()),
             f"| minilora / peft | {ratio:.3f} |"]
    write_results(RESULTS / "trainable_tokens_memory", table, {"args": vars(args), "rows": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
