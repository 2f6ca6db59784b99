r"""Memory and time of a QLoRA training step under DDP (every process holds the whole NF4 base) and
FSDP2 (each holds 1/world of it), measured in one run of 2 CPU processes; and the same accounting
on paper for LLaMA-7B / 70B at world sizes 2, 8 and 64.

    python benchmarks/fsdp_memory.py              launches 2 processes with torchrun, writes
                                                  benchmarks/results/fsdp_memory.{json,md}

Per process, for each of DDP and FSDP:
    base bytes     frozen parameters and buffers this process holds (its local shards)
    peak step      most tensor bytes alive at once during one optimizer step: the resident model,
                   adapter, gradients and optimizer state, plus what the step allocates (activations,
                   a unit's all-gathered parameters, a layer's dequantized weight). Counted exactly,
                   storage by storage, by a dispatch mode (not RSS: the allocator's caching and the
                   interpreter would blur the comparison).
    step time      median over interleaved repeats; reported as FSDP / DDP.

The accounting (bytes per process; P_q quantized weights, P_d dense frozen weights, P_a adapter):

    base      = (P_q · (1/2 + 1/64 + 4/(64·256)) + P_d · b_d) / world           NF4 + double-quant scales
    adapter   = P_a · (4 + 4 + 8) / world                                       fp32 weights, grads, AdamW
    transient = 2 decoder layers' NF4 bytes all-gathered (the one running, the next one prefetched)
                + the output head gathered + the largest weight dequantized
    DDP: the same with world = 1 for base and adapter (and nothing gathered)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
import torch.utils._python_dispatch
import torch.utils._pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved_medians, write_results  # noqa: E402

WORLD = 2
SMALL = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
             num_attention_heads=8, num_key_value_heads=4)
PAPER = {  # LLaMA 2 shapes
    "LLaMA-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "LLaMA-70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8),
}
NF4_BYTES_PER_WEIGHT = 1 / 2 + 1 / 64 + 4 / (64 * 256)  # codes, 8-bit scales, fp32 scales of scales
ADAPTER_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, gradient, AdamW's two moments


# ---------------------------------------------------------------------------------------------- accounting
def layer_shapes(c: dict) -> list[tuple[int, int]]:
    """(out, in) of the linear layers of one LLaMA decoder layer."""
    d, f = c["hidden_size"], c["intermediate_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]  # q k v o gate up down


def accounting(c: dict, world: int, rank: int = 16, dense_bytes: int = 2, sharded: bool = True,
               targets: tuple = (0, 2)) -> dict:
    """Bytes per process of a QLoRA step (LoRA of `rank` on the linear layers `targets` of
    layer_shapes: q and v by default), activations excluded: they are the same under DDP and FSDP
    for the same per-process batch."""
    shapes, layers, d = layer_shapes(c), c["num_hidden_layers"], c["hidden_size"]
    quantized = layers * sum(o * i for o, i in shapes)
    dense = 2 * c["vocab_size"] * d + (2 * layers + 1) * d  # embeddings, head, norms
    adapter = layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    split = world if sharded else 1
    base = (quantized * NF4_BYTES_PER_WEIGHT + dense * dense_bytes) / split
    states = adapter * ADAPTER_BYTES_PER_PARAM / split
    one_layer = sum(o * i for o, i in shapes) * NF4_BYTES_PER_WEIGHT
    head = c["vocab_size"] * d * dense_bytes
    widest = max(o * i for o, i in shapes) * dense_bytes
    transient = (2 * one_layer + head if sharded else 0) + widest
    return {"base": base, "adapter_states": states, "transient": transient, "total": base + states + transient}


# ---------------------------------------------------------------------------------------------- measuring
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes of tensor storage alive at once while active: storages created inside (every
    op's outputs) and those registered with `hold`, each counted at its current size (FSDP frees an
    all-gathered unit by resizing its storage to 0)."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.storages: dict[int, weakref.ref] = {}
        for t in resident:
            self._track(t)
        self.peak = self.now()

    def _track(self, t) -> None:
        if isinstance(t, torch.Tensor):
            from minilora.train.fsdp import local

            storage = local(t).untyped_storage()
            key = id(storage)
            if key not in self.storages:
                self.storages[key] = weakref.ref(storage, lambda _, key=key: self.storages.pop(key, None))

    def now(self) -> int:
        return sum(s.nbytes() for s in (ref() for ref in list(self.storages.values())) if s is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._track(t)
        self.peak = max(self.peak, self.now())
        return out


def resident(trainer) -> list[torch.Tensor]:
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return tensors


def build(parallel: str, seq: int, batch: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from minilora import LoraConfig, get_peft_model
    from minilora.quant import NF4Config, quantize_model
    from minilora.train.data import Examples
    from minilora.train.trainer import Trainer, TrainConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, max_position_embeddings=seq, tie_word_embeddings=False))
    quantize_model(model, NF4Config(), skip_modules=["lm_head"])
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"]))
    ids = torch.randint(0, SMALL["vocab_size"], (64, seq))
    rows = Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, "domain")
    config = TrainConfig(steps=1000, batch_size=batch, lr=1e-4, progressbar=False, parallel=parallel, eval_every=1000)
    return Trainer(model, config, rows, rows, log=lambda line: None)


def worker(out: Path, repeats: int, seq: int, batch: int) -> None:
    from minilora.train.distributed import teardown
    from minilora.train.fsdp import local_bytes

    rank = int(os.environ["RANK"])
    trainers = {mode: build(mode, seq, batch) for mode in ("ddp", "fsdp")}
    record = {}
    for mode, trainer in trainers.items():
        trainer._train_step()  # the optimizer state exists from here on
        tracker = LiveBytes(resident(trainer))
        with tracker:
            trainer._train_step()
        record[mode] = {"base_bytes": local_bytes(trainer.model), "peak_step_bytes": tracker.peak,
                        "resident_bytes": LiveBytes(resident(trainer)).peak}
    times = interleaved_medians({mode: t._train_step for mode, t in trainers.items()}, repeats)
    for mode in trainers:
        record[mode]["step_seconds"] = times[mode]
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    teardown()


# ---------------------------------------------------------------------------------------------- the report
def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def report(out: Path, repeats: int, seq: int, batch: int) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    ddp, fsdp_ = ranks[0]["ddp"], ranks[0]["fsdp"]
    worst = {mode: {k: max(r[mode][k] for r in ranks) for k in ranks[0][mode]} for mode in ("ddp", "fsdp")}
    ratios = {k: worst["fsdp"][k] / worst["ddp"][k] for k in ("base_bytes", "peak_step_bytes", "step_seconds")}
    paper_small = {"ddp": accounting(SMALL, WORLD, dense_bytes=4, sharded=False),
                   "fsdp": accounting(SMALL, WORLD, dense_bytes=4)}
    # the accounting's prediction of FSDP's peak from DDP's measured one: what sharding removes and adds
    predicted_peak = (worst["ddp"]["peak_step_bytes"] - (paper_small["ddp"]["base"] - paper_small["fsdp"]["base"])
                      - (paper_small["ddp"]["adapter_states"] - paper_small["fsdp"]["adapter_states"])
                      + paper_small["fsdp"]["transient"] - paper_small["ddp"]["transient"])
    table = [
        f"QLoRA step, LLaMA-style {SMALL['num_hidden_layers']} layers × {SMALL['hidden_size']} (NF4 base, LoRA r=16 "
        f"on q and v), {WORLD} CPU processes (gloo), batch {batch}×{seq} per process; worst process; "
        f"step time median of {repeats} interleaved repeats",
        "",
        "| per process | DDP | FSDP | FSDP / DDP | goal |",
        "|---|---|---|---|---|",
        f"| frozen base bytes | {mib(worst['ddp']['base_bytes'])} | {mib(worst['fsdp']['base_bytes'])} | "
        f"{ratios['base_bytes']:.3f} | ≤ 0.55 |",
        f"| peak step bytes | {mib(worst['ddp']['peak_step_bytes'])} | {mib(worst['fsdp']['peak_step_bytes'])} | "
        f"{ratios['peak_step_bytes']:.3f} | ≤ 0.7 |",
        f"| step time | | | {ratios['step_seconds']:.3f} | ≤ 1.5 |",
        "",
        "The accounting against the measurement (same model):",
        "",
        "| | accounting | measured |",
        "|---|---|---|",
        f"| DDP base bytes | {mib(paper_small['ddp']['base'])} | {mib(worst['ddp']['base_bytes'])} |",
        f"| FSDP base bytes | {mib(paper_small['fsdp']['base'])} | {mib(worst['fsdp']['base_bytes'])} |",
        f"| FSDP peak step (DDP's measured peak − what sharding removes + what FSDP gathers) | "
        f"{mib(predicted_peak)} | {mib(worst['fsdp']['peak_step_bytes'])} |",
        "",
        "On paper, QLoRA (NF4 + double quant, bf16 embeddings and head, LoRA r=16 on q and v, AdamW), "
        "per GPU, activations excluded:",
        "",
        "| model | DDP (any world) | FSDP world 2 | FSDP world 8 | FSDP world 64 |",
        "|---|---|---|---|---|",
    ]
    paper = {}
    for name, c in PAPER.items():
        cells = {"ddp": accounting(c, 1, sharded=False)}
        cells.update({f"fsdp{w}": accounting(c, w) for w in (2, 8, 64)})
        paper[name] = cells
        table.append(f"| {name} | " + " | ".join(gib(cells[k]["total"]) for k in ("ddp", "fsdp2", "fsdp8", "fsdp64"))
                     + " |")
    write_results(RESULTS / "fsdp_memory", table, {
        "world": WORLD, "model": SMALL, "batch": batch, "seq": seq, "repeats": repeats, "ranks": ranks,
        "worst": worst, "ratios": ratios, "accounting_small": paper_small, "predicted_fsdp_peak": predicted_peak,
        "paper": paper})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.repeats, args.seq, args.batch)
        return
    out = Path("runs") / "fsdp_memory"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                    __file__, "--worker", str(out), "--repeats", str(args.repeats), "--seq", str(args.seq),
                    "--batch", str(args.batch)], env=env, check=True)
    report(out, args.repeats, args.seq, args.batch)


if __name__ == "__main__":
    main()
