"""Peak memory of loading a model: full precision (`from_pretrained`) against `load_quantized`.

    python benchmarks/load_quantized_memory.py [--hidden 1024 --layers 8]

Saves a LLaMA-style model with random weights as sharded fp32 safetensors in a temporary
directory, then loads it in fresh processes and reports each one's peak resident memory above
the same process's memory after the same warm-up (VmHWM − baseline), after touching every weight (a
lazily mapped checkpoint is not in memory until used). Writes
benchmarks/results/load_quantized_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, write_results

PROBE = r"""
import json, sys
from pathlib import Path
import torch, transformers
from minilora import load_quantized, memory_report, NF4Config

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024

# the same warm-up in both modes: import the model code and the native NF4 path before measuring
transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sys.argv[1]).__class__(
    hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, vocab_size=64))
from minilora.quant import nf4_quantize
nf4_quantize(torch.randn(1 << 17))
Path("/proc/self/clear_refs").write_text("5")
base = rss("VmRSS:")
if sys.argv[2] == "full":
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
else:
    model = load_quantized(sys.argv[1], NF4Config(), model_class=transformers.AutoModelForCausalLM)
    weights_mb = (sum(p.numel() * p.element_size() for p in model.parameters())
                  + sum(b.numel() * b.element_size() for b in model.buffers())) / 2**20
with torch.no_grad():  # touch every weight: a lazily mapped checkpoint is not yet in memory
    for t in list(model.parameters()) + list(model.buffers()):
        t.float().sum()
print(json.dumps({"peak_above_baseline_mb": rss("VmHWM:") - base, "model_mb": weights_mb}))
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_quantized_memory")
    args = parser.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, vocab_size=2048)
        LlamaForCausalLM(cfg).save_pretrained(tmp, max_shard_size="100MB")
        shards = len(list(Path(tmp).glob("*.safetensors")))
        rows = {}
        for mode in ("full", "quantized"):
            out = subprocess.run([sys.executable, "-c", PROBE, tmp, mode], capture_output=True, text=True, check=True)
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = rows["quantized"]["peak_above_baseline_mb"] / rows["full"]["peak_above_baseline_mb"]
    table = ["| load | model in memory (MB) | peak above baseline (MB) |", "|---|---:|---:|",
             f"| from_pretrained, fp32 | {rows['full']['model_mb']:.0f} | {rows['full']['peak_above_baseline_mb']:.0f} |",
             f"| load_quantized, NF4 | {rows['quantized']['model_mb']:.0f} | {rows['quantized']['peak_above_baseline_mb']:.0f} |",
             f"| ratio of peaks | | {ratio:.2f} |"]
    print(f"LLaMA-style, hidden {args.hidden}, {args.layers} layers, {shards} safetensors shards")
    write_results(args.out, table, {"rows": rows, "ratio": ratio, "shards": shards})
    return rows


if __name__ == "__main__":
    main()
