"""`minilora finetune --model DIR --data FILE …`: fine-tune a local Hugging Face model with LoRA.

    1. check every input before any work: model directory, data files, flags, output directory
       (read only: nothing in it changes, and --overwrite deletes nothing, until every check of
       steps 2 to 4 has passed; a non-empty directory that holds no run is never used)
    2. tokenizer (the model's own, or bytes) → rows for the task (data.py)
    3. model: from_pretrained, or with --qlora its linear layers stored in NF4 (quantized while
       loading where the checkpoint is safetensors), then LoRA from --config / --preset / default, or
       the adapter --adapter DIR holds (the SFT adapter a DPO run measures against: --reference)
    4. Trainer: forgetting monitor on --retain, replay, checkpoints, resume (trainer.py)
    5. <out>/adapter (PEFT format), metrics.jsonl, curves.png, result.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import LoraConfig
from ..files import atomic_write, read_json_object
from ..adapter_files import read_config_file
from .. import hf_dir, presets
from . import packing
from ..model import LoraModel, get_peft_model
from ..params import format_trainable
from ..surgery import TASK_HEADS
from ..quant import NF4Config, load_quantized, quantize_model
from . import checkpoint
from . import reference as reference_policy
from .distributed import barrier, setup
from .data import DataError, existing, load_tokenizer
from ..mixing import BASE
from ..state_names import check_adapter_name
from .tasks import load_examples, retain_examples, task_named
from .train_config import TrainConfig, check_batch
from .together import AdapterData, TogetherResult, TogetherTrainer, one_adapter_each
from .trainer import Trainer, TrainResult

POSITION_KEYS = ("n_positions", "max_position_embeddings")  # config.json's longest sequence, by family


@dataclass
class JobSettings:
    """What to fine-tune on what; the training settings are TrainConfig's."""

    model: str  # a local Hugging Face model directory: config.json, weights, tokenizer
    data: Optional[str] = None  # training data: .txt (domain) or .jsonl (any task)
    adapters: Optional[str] = None  # NAME=DATA[,NAME=DATA...]: one adapter per data file, trained together
    # in one pass over the base (together.py), instead of --data
    out: str = "runs/job"  # checkpoints, metrics, curves and the adapter go here
    val: Optional[str] = None  # validation data; default: val_fraction of the training data held out
    val_fraction: float = 0.1
    retain: Optional[str] = None  # text of the old capabilities, evaluated at every evaluation
    replay: Optional[str] = None  # text mixed into training batches; default: the retain file
    config: Optional[str] = None  # a LoraConfig as JSON (minilora's or PEFT's adapter_config.json)
    preset: Optional[str] = None  # a plan of minilora.presets ("article")
    adapter: Optional[str] = None  # start from this adapter directory (PEFT format), e.g. the SFT adapter that
    # --reference adapter:NAME names (it is loaded under NAME); otherwise --config / --preset / the default
    qlora: bool = False  # store the base in 4-bit NF4 (double-quantized scales)
    tokenizer: str = "auto"  # auto: the model's own | bytes: 256 byte values
    seq_len: int = 128  # tokens per example
    pack: bool = False  # several examples per row, none padded (packing.py): domain, instruction, preference
    resume: bool = False  # continue the run in `out` from its checkpoint
    overwrite: bool = False  # delete the run in `out` and start again


def check(s: JobSettings, t: TrainConfig) -> None:
    """Every input problem that can be found before loading anything, with what to do."""
    t.check()
    if (s.data is None) == (s.adapters is None):
        raise ValueError("pass --data FILE (one adapter) or --adapters NAME=FILE,NAME=FILE (one adapter per file, "
                         "trained together), not both")
    if s.adapters is not None:
        for flag, value in (("--val", s.val), ("--adapter", s.adapter), ("--replay", s.replay)):
            if value is not None:
                raise ValueError(f"{flag} is not used with --adapters: each adapter holds out --val-fraction of its "
                                 "own file and starts fresh; drop it")
        adapter_files(s.adapters)
    directory = Path(s.model)
    if not directory.is_dir():
        raise DataError(f"--model {s.model}: no such directory; pass a local Hugging Face model directory")
    if not hf_dir.has_config(directory):
        raise DataError(f"{directory} has no config.json: it is not a Hugging Face model directory")
    if not hf_dir.has_weights(directory):
        raise DataError(f"{directory} has no weights (none of {', '.join(hf_dir.WEIGHT_FILES)}); save the model with "
                        "save_pretrained")
    if s.preset is not None and s.preset not in presets.PRESETS:
        raise ValueError(f"unknown preset {s.preset!r}; choose from {', '.join(presets.PRESETS)} (or pass --config)")
    if s.pack and t.task not in packing.PACKABLE_TASKS:
        raise ValueError(f"--pack packs {', '.join(packing.PACKABLE_TASKS)} rows, not --task {t.task}: drop --pack")
    if sum(x is not None for x in (s.preset, s.config, s.adapter)) > 1:
        raise ValueError("--preset, --config and --adapter each choose the adapters: pass one of them")
    if s.adapter is not None and not Path(s.adapter).is_dir():
        raise DataError(f"--adapter {s.adapter}: no such directory; pass an adapter directory saved by "
                        "save_pretrained (adapter_config.json and adapter_model.safetensors)")
    if s.preset == "article" and not task_named(t.task).causal_lm:
        raise ValueError(f"--preset article trains an LM head: it fits domain and instruction tuning, not "
                         f"{t.task}; pass --config instead")
    if t.forgetting_budget is not None and s.retain is None:
        raise ValueError("--forgetting-budget needs a retain set to measure forgetting: pass --retain FILE")
    if t.replay_ratio > 0 and s.replay is None and s.retain is None:
        raise ValueError("--replay-ratio needs text to replay: pass --replay FILE (or --retain FILE)")
    if s.replay is not None and t.replay_ratio == 0:
        raise ValueError("--replay is used only with --replay-ratio > 0 (the fraction of each batch to replay)")
    if t.replay_ratio > 0 and not task_named(t.task).replays_text:
        raise ValueError(f"replay mixes text into causal-LM batches; it does not fit {t.task}")
    if not 0 < s.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {s.val_fraction}")
    if s.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {s.seq_len}")
    key, limit = position_limit(directory)
    if limit is not None and s.seq_len > limit:
        raise ValueError(f"--seq-len {s.seq_len} is longer than the model reads: {directory / 'config.json'} has "
                         f"{key} = {limit}; lower --seq-len to at most {limit}")


def adapter_files(spec: str) -> dict[str, Path]:
    """--adapters "NAME=FILE,NAME=FILE" as {name: path}, each name a valid adapter name, each file there."""
    out = {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapters {spec!r}: {item!r} is not NAME=FILE; write e.g. finance=finance.txt,law=law.txt")
        name = name.strip()
        check_adapter_name(name, reserved=BASE)
        if name in out:
            raise ValueError(f"--adapters names {name!r} twice: give each adapter one data file")
        out[name] = existing(path.strip())
    if not out:
        raise ValueError("--adapters is empty: write NAME=FILE,NAME=FILE")
    return out


def position_limit(directory: Path) -> tuple[Optional[str], Optional[int]]:
    """(the config key, the most token positions the model has embeddings for), or (None, None) for a
    model without a limit of its own (relative positions, such as T5's)."""
    config = read_json_object(directory / "config.json", "a Hugging Face model config",
                              "save the model with save_pretrained", DataError)
    for key in POSITION_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return key, config[key]
    return None, None


def lora_config(s: JobSettings, task: str) -> LoraConfig:
    """The adapters: --config, --preset, or Q and V of every layer at r=8."""
    if s.preset is not None:
        return presets.preset(s.preset)
    if s.config is None:
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], task_type=task_named(task).task_type)
    config = read_config_file(s.config)
    if config.task_type is None:
        config.task_type = task_named(task).task_type
    return config


def load_model(s: JobSettings, task: str, n_labels: Optional[int], log: Callable[[str], None]):
    import transformers

    directory = Path(s.model)
    cls = getattr(transformers, task_named(task).model_class)
    labelled = task_named(task).has_labels
    nf4 = NF4Config(compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    safetensors = hf_dir.has_safetensors(directory)
    if s.qlora and safetensors and not labelled:  # a new classifier has no weights to stream
        model = load_quantized(directory, nf4, model_class=cls)
        log(f"loaded {directory} with its linear layers quantized to NF4 while reading")
        return model
    model = cls.from_pretrained(directory, **({"num_labels": n_labels} if labelled else {}))
    if s.qlora:
        report = quantize_model(model, nf4, skip_modules=list(TASK_HEADS["SEQ_CLS"]))  # the new head trains
        log(f"quantized {report.modules} layers to NF4: {report.bits_per_weight:.3f} bits per weight")
    return model


def run_job(s: JobSettings, t: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune `s.model` on `s.data`; the Trainer's result. See the module docstring.

    Everything that can refuse the run comes before anything in `s.out` changes: the settings, the
    output directory (read only), the data, the batch against the data, the model against the
    tokenizer and the Trainer's own checks. Only then is an old run deleted (--overwrite) and this
    one recorded, so a run refused for any reason leaves the directory as it found it."""
    check(s, t)
    if s.adapters is not None:
        return run_together(s, t, log)
    out, run, procs, log = _open(s, t, log)
    tokens = load_tokenizer(s.model, s.tokenizer)
    train = load_examples(s.data, t.task, tokens, s.seq_len)
    labels = train.label_names
    if s.val is not None:
        val = load_examples(s.val, t.task, tokens, s.seq_len, labels)
    else:
        train, val = train.split(s.val_fraction, seed=t.seed)
        log(f"validation: {len(val)} of the {len(train) + len(val)} examples of {s.data} held out")
    if s.pack:  # the batch counts packed rows
        train, val = _packed(train, tokens, s.seq_len), _packed(val, tokens, s.seq_len)
        width = train.tensors["input_ids"].shape[-1]  # preference: 2 · --seq-len, what one padded pair takes
        log(f"packed: {len(train)} rows of {width} tokens hold the training examples")
    check_batch(t, len(train), procs.world)
    retain = retain_examples(s.retain, t.task, tokens, s.seq_len, labels) if s.retain else None
    replay_file = s.replay or s.retain
    replay = retain_examples(replay_file, t.task, tokens, s.seq_len, labels) if t.replay_ratio > 0 else None
    if replay is not None and s.pack:
        replay = _packed(replay, tokens, s.seq_len)  # rows of the training rows' kind

    torch.manual_seed(t.seed)  # a new head and the adapters start the same in every run and every process
    model = _base_model(s, t, tokens, len(labels) if labels else None, log)
    if s.adapter is not None:  # the adapter to start from, under the name the reference gives it
        name = reference_policy.adapter_of(getattr(t.task_settings, "reference", "base")) or "default"
        model = LoraModel.from_pretrained(model, s.adapter, adapter_name=name, is_trainable=True).train()
    else:
        model = get_peft_model(model, lora_config(s, t.task))
    log(format_trainable(*model.get_nb_trainable_parameters()))
    trainer = Trainer(model, t, train, val, retain, replay, out=out, log=log, processes=procs)
    _record(out, run, s, procs, labels)
    return trainer.train(resume=s.resume)


def run_together(s: JobSettings, t: TrainConfig, log: Callable[[str], None] = print) -> TogetherResult:
    """--adapters NAME=FILE,...: one adapter per file, trained together in one pass (together.py). Each
    adapter starts as a run of its own on its file would (the same seed, the same initial weights),
    holds out --val-fraction of its file, and is watched on the shared --retain set."""
    out, run, procs, log = _open(s, t, log)
    tokens = load_tokenizer(s.model, s.tokenizer)
    retain = retain_examples(s.retain, t.task, tokens, s.seq_len) if s.retain else None
    domains = {}
    for name, path in adapter_files(s.adapters).items():
        train, val = load_examples(path, t.task, tokens, s.seq_len).split(s.val_fraction, seed=t.seed)
        if s.pack:
            train, val = _packed(train, tokens, s.seq_len), _packed(val, tokens, s.seq_len)
        log(f"adapter {name}: {len(train)} training and {len(val)} validation examples from {path}")
        domains[name] = AdapterData(train, val, retain)
    torch.manual_seed(t.seed)
    model = _base_model(s, t, tokens, None, log)
    model = one_adapter_each(model, list(domains), lora_config(s, t.task))  # each starts as a run of its own
    log(format_trainable(*model.get_nb_trainable_parameters()))
    trainer = TogetherTrainer(model, t, domains, out=out, log=log, processes=procs)
    _record(out, run, s, procs, None)
    return trainer.train(resume=s.resume)


def _open(s: JobSettings, t: TrainConfig, log: Callable[[str], None]):
    """(out, the run's recorded settings, processes, log): the output directory checked, read only."""
    out = Path(s.out)
    run = {**{k: v for k, v in asdict(s).items() if k not in ("resume", "overwrite")},
           **t.settings()}
    procs = setup()
    if procs.is_main:  # one process reads the directory (and later prepares it); the others wait for it
        checkpoint.check_directory(out, run, s.resume, s.overwrite)
    else:
        log = _silent
    barrier(procs)
    return out, run, procs, log


def _packed(examples, tokens, seq_len: int):
    return packing.pack(examples, seq_len, tokens.pad_id or 0)


def _base_model(s: JobSettings, t: TrainConfig, tokens, n_labels: Optional[int], log):
    """The transformers model, checked against the tokenizer (and, with --pack, against packing)."""
    model = load_model(s, t.task, n_labels, log)
    vocab = model.get_input_embeddings().num_embeddings
    if tokens.vocab_size > vocab:
        raise DataError(f"the tokenizer has {tokens.vocab_size} tokens but the model's embedding only {vocab}; "
                        "use the model's own tokenizer")
    if s.pack:
        packing.check_model(model)
    return model


def _record(out: Path, run: dict, s: JobSettings, procs, labels) -> None:
    """Every check passed: now the old run may go (--overwrite) and this one is recorded."""
    if procs.is_main:
        checkpoint.prepare(out, run, s.resume, s.overwrite)
        if labels:  # class index -> name, for whoever uses the adapter
            atomic_write(out / "labels.json", lambda p: Path(p).write_text(json.dumps(labels)))
    barrier(procs)


def _silent(line: str) -> None:
    pass

