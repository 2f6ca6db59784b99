"""Sharded training (FSDP2, --parallel fsdp): the same training as one process, the NF4 base split
across processes, checkpoints that resume exactly, and clear refusals.

Three torchrun launches (2 processes; 3 processes; 2 "nodes" of 1 process joined by a rendezvous on
the loopback address) run tests/fsdp_worker.py; the single-process reference runs here, in-process.
Every run sees the same global batch of 6 rows per step.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minilora.quant import Linear4bit, NF4Config
from minilora.train import fsdp
from minilora.train.trainer import TrainConfig

WORKER = Path(__file__).parent / "fsdp_worker.py"
CASES = ["lora-adamw", "lora-paged_adamw", "qlora-adamw", "qlora-paged_adamw", "qlora_head-adamw",
         "qlora_checkpointed-adamw"]
_spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(args: list[str], out: Path, cases: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, str(WORKER), str(out), *cases],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]


def _records(out: Path, case: str) -> list[dict]:
    files = sorted((out / case).glob("rank*.json"))
    assert files, f"no records in {out / case}"
    return [json.loads(f.read_text()) for f in files]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every launch once: {"single", "two", "three", "nodes"} -> output directory."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {name: root / name for name in ("single", "two", "three", "nodes")}
    _finish(_torchrun(["--standalone", "--nproc_per_node=2"], out["two"], CASES + ["resume", "mixed"]))
    three = _torchrun(["--standalone", "--nproc_per_node=3"], out["three"],
                      ["qlora-adamw", f"refuse={out['two'] / 'resume'}"])
    for case in CASES:  # the reference, here, while the three processes run
        (out["single"] / case).mkdir(parents=True)
        record = worker.run_case(case, out["single"] / case, 1, 0)
        (out["single"] / case / "rank0.json").write_text(json.dumps(record))
    _finish(three)
    port = _free_port()
    nodes = [_torchrun(["--nnodes=2", "--nproc_per_node=1", f"--node-rank={rank}", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=rehearsal"], out["nodes"], ["qlora-adamw"])
             for rank in (0, 1)]
    for node in nodes:
        _finish(node)
    return out


def _close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) == worker.STEPS and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", CASES)
def test_sharded_losses_equal_one_process_on_the_same_global_batch(runs, case):
    reference = _records(runs["single"], case)[0]["losses"]
    ranks = _records(runs["two"], case)
    assert [r["world"] for r in ranks] == [2, 2]
    for record in ranks:
        assert _close(record["losses"], reference), (record["losses"], reference)
        assert record["chunked"]  # the chunked loss, sharded head and all
    assert reference[-1] < reference[0] - 0.1  # it trained


@pytest.mark.parametrize("case", CASES)
def test_every_rank_gets_finite_nonzero_gradients_and_the_base_stays_frozen(runs, case):
    for record in _records(runs["two"], case):
        grads = record["grads"]
        trained = 12 + ("_head" in case)  # 6 LoRA layers × (A, B), and the head's trainable copy
        assert grads["count"] == grads["params"] == trained  # every trained tensor has a gradient shard
        assert grads["finite"]
        assert grads["nonzero"] == grads["nonempty"] == trained  # not the silent zeros of a broken 4-bit unit
        assert record["frozen_requires_grad"] == []  # codes and scales never train


def test_the_saved_adapter_is_the_one_a_single_process_saves(runs):
    for case in CASES:
        single_dir, sharded_dir = runs["single"] / case / "adapter", runs["two"] / case / "adapter"
        single = load_file(single_dir / "adapter_model.safetensors")
        sharded = load_file(sharded_dir / "adapter_model.safetensors")
        assert single.keys() == sharded.keys() and len(single) == 12 + ("_head" in case)
        for key, value in single.items():
            assert sharded[key].shape == value.shape and sharded[key].numel() > 0, key  # never torch.Size([0])
            assert (sharded[key] - value).abs().max() <= 1e-4 * value.abs().max(), key
        assert (sharded_dir / "adapter_config.json").read_text() == (single_dir / "adapter_config.json").read_text()


def test_each_process_holds_its_share_of_the_nf4_base(runs):
    single = _records(runs["single"], "qlora-adamw")[0]
    for world in ("two", "three"):
        ranks = _records(runs[world], "qlora-adamw")
        whole = single["nf4_bytes_whole"]
        assert whole > 30_000 and all(r["nf4_bytes_whole"] == whole for r in ranks)
        assert sum(r["nf4_bytes_local"] for r in ranks) == whole  # the shards partition codes and scales
        for record in ranks:
            assert record["nf4_bytes_local"] <= 1.05 * whole / len(ranks)
            assert record["frozen_bytes_local"] <= 1.05 * single["frozen_bytes_local"] / len(ranks)


def test_three_processes_on_block_counts_they_do_not_divide(runs):
    reference = _records(runs["single"], "qlora-adamw")[0]["losses"]
    ranks = _records(runs["three"], "qlora-adamw")
    assert len(ranks) == 3
    for record in ranks:
        assert _close(record["losses"], reference)
        grads = record["grads"]
        assert grads["finite"] and grads["nonzero"] == grads["nonempty"]
    assert min(r["grads"]["nonempty"] for r in ranks) < 12  # some shards of a rank-4 lora_A are empty: fine


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_after_an_interruption_continues_exactly(runs):
    uninterrupted = _records(runs["two"], "qlora-adamw")
    for resumed, straight in zip(_records(runs["two"], "resume"), uninterrupted):
        assert resumed["losses"] == straight["losses"]  # steps 1–6, interrupted, then 7–10 resumed: bit for bit
    assert (runs["two"] / "resume" / "checkpoint.shards").is_dir()
    a = load_file(runs["two"] / "resume" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["two"] / "qlora-adamw" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resuming_on_another_number_of_processes_is_refused(runs):
    for record in _records(runs["three"], "refuse"):
        message = record["refused"]
        assert message is not None and "written by 2 processes" in message and "this run has 3" in message
        assert "--overwrite" in message


# ---------------------------------------------------------------------------------------------- launch
def test_two_nodes_joined_by_a_rendezvous_equal_one_two_process_launch(runs):
    nodes, local = _records(runs["nodes"], "qlora-adamw"), _records(runs["two"], "qlora-adamw")
    assert [r["world"] for r in nodes] == [2, 2]
    for a, b in zip(nodes, local):
        assert a["losses"] == b["losses"]
    a = load_file(runs["nodes"] / "qlora-adamw" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["two"] / "qlora-adamw" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_mixed_batch_forward_runs_on_the_sharded_model(runs):
    for record in _records(runs["two"], "mixed"):
        assert record["mixed_scale"] > 0.1 and record["mixed_error"] <= 1e-5 * record["mixed_scale"]


def test_fsdp_without_torchrun_says_how_to_launch(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        TrainConfig(parallel="fsdp").check()
    with pytest.raises(ValueError, match="choose from ddp, fsdp"):
        TrainConfig(parallel="zero3").check()
    from minilora.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "d.txt").write_text("text")
    assert main(["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"),
                 "--parallel", "fsdp"]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("shape", [(48, 64), (7, 9)])  # whole blocks; a last block cut short
def test_the_shardable_nf4_layout_computes_what_the_flat_one_does(shape):
    torch.manual_seed(0)
    dense = torch.nn.Linear(shape[1], shape[0])
    layer = Linear4bit.from_float(dense, NF4Config(blocksize=32))
    x = torch.randn(3, shape[1])
    flat_codes, before, weight = layer.weight.clone(), layer(x), layer.dequantized_weight()
    layer.make_shardable()
    n_blocks = -(-shape[0] * shape[1] // 32)
    assert layer.weight.shape == (n_blocks, 16) and layer.absmax.shape == (n_blocks,)  # one row per block
    assert isinstance(layer.weight, torch.nn.Parameter) and not layer.weight.requires_grad
    assert not layer.absmax.requires_grad and layer.absmax.dtype == torch.uint8  # double-quant codes
    assert torch.equal(layer.packed, flat_codes)  # the same bytes
    assert torch.equal(layer(x), before) and torch.equal(layer.dequantized_weight(), weight)
    assert layer.make_shardable().weight.shape == (n_blocks, 16)  # idempotent
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.absmax2.dtype == torch.float32  # scales never converted
    assert isinstance(layer.absmax2, torch.nn.Parameter)


def test_a_unit_that_trains_two_dtypes_is_refused():
    unit = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16))
    with pytest.raises(ValueError, match="two dtypes.*model.float"):
        fsdp.check_unit_dtypes(unit, list(unit.named_parameters()))
    unit[1].requires_grad_(False)
    fsdp.check_unit_dtypes(unit, list(unit.named_parameters()))  # frozen parameters may differ
