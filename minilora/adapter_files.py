"""Adapter files in PEFT's format, both ways: what minilora saves PEFT loads, and the other way round.

    <dir>/adapter_config.json          PEFT's field names, nothing else (PEFT warns on keys it does not know)
    <dir>/minilora_config.json         minilora's own config (roles, bands, slices), tied by hash to the above
    <dir>/README.md                    a model card, as PEFT writes one (one already there keeps its text)
    <dir>/adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, d_in)
                                       base_model.model.<module path>.lora_B.weight   (d_out, r)
                                       base_model.model.<module path>.lora_embedding_A  (r, num_embeddings)
                                       base_model.model.<module path>.lora_embedding_B  (embedding_dim, r)
                                                      embeddings: no ".weight", as PEFT writes them
                                       base_model.model.<module path>.lora_magnitude_vector  (d_out,)
                                                      DoRA only; PEFT writes it without ".weight", both read
                                       base_model.model.<module path>.<param>         modules_to_save
    <dir>/<name>/...                   every adapter other than "default", as PEFT does

Sliced adapters. PEFT has no slices, so an adapter on the Q and V parts of a fused layer is
written as one LoRA of rank r_q + r_v over the whole fused output, which computes the same thing:

    A = [ A_q ]   (r_q + r_v, d_in)        B = [ B_q   0  ]  rows of q      (d_out, r_q + r_v)
        [ A_v ]                                [  0    0  ]  rows of k: zero, K stays untouched
                                               [  0   B_v ]  rows of v

    B·A = [B_q A_q ; 0 ; B_v A_v]. The scale must not change: with α/r scaling, α doubles with r.
    Interleaved layouts (GPT-NeoX's [q_h k_h v_h] per head) place B_q's rows where the q rows of
    each head sit, with zeros between them, so PEFT computes the same output there too.

A DoRA adapter on slices exports the same way: its norms are per output row, so the whole-layer
lora_magnitude_vector holds the slices' m and, for K's rows, ‖W_row‖ (gain 1); see dora.py.

`minilora_config.json` keeps the original config (roles, bands), so minilora reads slices back as
slices; it carries the SHA-256 of the adapter_config.json it belongs to, and is ignored when that
file has changed since (say, PEFT saved over the directory). Files written by earlier versions,
with a "minilora" key inside adapter_config.json, still load.

An adapter directory changes as a whole (files.replace_files): the new files are staged, committed
with one rename, then moved into place; `read_adapter` reads the set as it was before or after the
commit, never a mix, also after a save killed at any point. Readers validate before they allocate:
config fields and numbers, finite tensors, ranks the weights can hold. Nothing in an adapter
directory is ever executed: tensors come from safetensors, or from `adapter_model.bin` through
`torch.load(weights_only=True)` only.

These are functions over plain data: a mapping of module path -> adapter layer (an AdapterLayer,
or ModulesToSave for a trained head) and the adapter's name and config in; tensors, config dicts and
files out. This file knows key prefixes and file layout only: each layer names its own tensors
(`file_tensors`, `load_file_tensors`). LoraModel decides which layers and biases belong to an
adapter and calls these functions.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import uuid
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import model_card
from .config import LoraConfig
from .dora import MAGNITUDE
from .files import read_optional, read_stable, replace_files

CONFIG_NAME = "adapter_config.json"
MINILORA_CONFIG_NAME = "minilora_config.json"
MODEL_CARD_NAME = "README.md"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
WEIGHT_NAMES = (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)  # in order of preference
PREFIX = "base_model.model."
GENERATION_KEY = "minilora_generation"  # safetensors metadata: which save wrote the weights
AdapterModules = dict[str, nn.Module]  # module path -> AdapterLayer or ModulesToSave holding the adapter

# PEFT fields minilora does not implement: ignored when they hold their default, refused otherwise.
_PEFT_DEFAULTS = {
    "layer_replication": None, "alora_invocation_tokens": None,
    "use_qalora": False, "use_bdlora": None, "eva_config": None, "corda_config": None,
    "arrow_config": None, "kasa_config": None, "lora_ga_config": None, "monteclora_config": None,
    "velora_config": None, "megatron_config": None,
}
# PEFT fields with no effect on the weights or on which modules are adapted.
_PEFT_INERT = {"auto_mapping", "revision", "peft_version", "megatron_core", "qalora_group_size",
               "ensure_weight_tying", "layers_pattern_type"}


# ---------------------------------------------------------------------------- model -> files
def adapter_tensors(modules: AdapterModules, name: str, use_rslora: bool, biases: dict[str, nn.Parameter]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """Adapter `name`'s tensors under PEFT's keys, and (r, alpha) per adapted module (or module
    parameter) as exported. Each layer names its own tensors (AdapterLayer.file_tensors); here they
    get their module's key prefix. `biases`: the base biases it trains, by parameter path."""
    tensors, ranks = {}, {}
    for path, module in modules.items():
        own, own_ranks = module.file_tensors(name, use_rslora)
        tensors.update({f"{PREFIX}{path}.{suffix}": t for suffix, t in own.items()})
        ranks.update({f"{path}.{unit}" if unit else path: r for unit, r in own_ranks.items()})
    for path, param in biases.items():
        tensors[PREFIX + path] = param.detach()
    return {k: v.contiguous() for k, v in tensors.items()}, ranks


def peft_config_dict(config: LoraConfig, modules: AdapterModules, name: str, ranks: dict[str, tuple[int, float]],
                     peft_reads_targets_alike: bool, base_model_name: Union[str, None]) -> dict:
    """The config PEFT reads. Roles, slices and bands become explicit module paths and patterns.
    `peft_reads_targets_alike`: PEFT would adapt the same modules from config.target_modules."""
    out = {k: v for k, v in config.to_dict().items() if k not in ("layer_bands", "component_ranks")}
    out["base_model_name_or_path"] = out["base_model_name_or_path"] or base_model_name or None
    out["inference_mode"] = True
    sliced = {path: m.sliced_parts(name) for path, m in modules.items() if m.sliced_parts(name)}
    parameters = {f"{path}.{p}" for path, m in modules.items() for p in m.target_parameters(name)}
    plain = not sliced and not parameters and config.layer_bands is None and not config.component_ranks \
        and peft_reads_targets_alike
    if not plain:
        # Explicit: every adapted module (and 3-D parameter) by its full path, and its exported rank/alpha.
        r0, a0 = next(iter(ranks.values()))
        out.update(r=r0, lora_alpha=a0, target_modules=sorted(set(ranks) - parameters),
                   target_parameters=sorted(parameters) or None, layers_to_transform=None,
                   layers_pattern=None, exclude_modules=None)
        out["rank_pattern"] = {_exact(p): r for p, (r, a) in ranks.items() if r != r0}
        out["alpha_pattern"] = {_exact(p): a for p, (r, a) in ranks.items() if a != a0}
    return out


def _exact(path: str) -> str:
    """A rank_pattern key (a regex in PEFT) that matches exactly this module path."""
    return path.replace(".", r"\.")


def adapter_directory(directory: Union[str, Path], name: str) -> Path:
    """Where adapter `name` lives under a save directory: "default" in it, any other in `<dir>/<name>`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; pick another path")
    return directory if name == "default" else directory / name


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], peft_config: dict, config: LoraConfig,
                  safe_serialization: bool = True, base_model: Union[str, None] = None) -> None:
    """The weights (safetensors, or with `safe_serialization=False` PEFT's adapter_model.bin: a
    dict of tensors), adapter_config.json, a model card (or PEFT's metadata added to the one there)
    and minilora_config.json, as one change of the directory (files.replace_files): a reader sees
    the old adapter or the new one, never a mix, even if the save is killed half-way.
    minilora_config.json ties the set together: it names the weights file and carries the hash of
    adapter_config.json and the weights' generation (a fresh id, also in the safetensors header), and
    it is new at every save, which is what lets a reader see that a save happened mid-read. `base_model`: the base model's own name (its config's `_name_or_path`),
    which the card's metadata names as PEFT's does; None for a model without one."""
    directory = Path(directory)
    weights, stale = (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if safe_serialization else (LEGACY_WEIGHTS_NAME, WEIGHTS_NAME)
    generation = uuid.uuid4().hex
    text = json.dumps(peft_config, indent=2, sort_keys=True)
    card_path = directory / MODEL_CARD_NAME
    card = model_card.updated(card_path.read_text(), base_model) if card_path.exists() else \
        model_card.new(base_model, peft_config)

    def write_weights(path: str) -> None:
        if safe_serialization:
            save_file(tensors, path, metadata={"format": "pt", GENERATION_KEY: generation})
        else:
            torch.save(tensors, path)

    def write_record(path: str) -> None:
        record = {"config": config.to_dict(), "adapter_config_sha256": hashlib.sha256(text.encode()).hexdigest(),
                  "weights": weights, "generation": generation}
        Path(path).write_text(json.dumps(record, indent=2))

    replace_files(directory, {
        weights: write_weights,  # the weights first: a reader unaware of the protocol (PEFT) never
        CONFIG_NAME: lambda path: Path(path).write_text(text),  # sees a config that promises missing tensors
        MODEL_CARD_NAME: lambda path: Path(path).write_text(card),
        MINILORA_CONFIG_NAME: write_record,  # last, and new at every save: read_stable's marker
    }, remove=(stale,))  # a reader prefers safetensors: no stale file may shadow


def read_adapter(directory: Union[str, Path], with_config: bool = True
                 ) -> tuple[Union[LoraConfig, None], dict[str, torch.Tensor]]:
    """The LoraConfig (None without `with_config`) and the tensors of the adapter saved in `directory`
    by minilora or by PEFT, read as one set: while a minilora save replaces the directory, and after
    one killed half-way, this gives the old adapter or the new one, never a mix (files.read_stable).
    Everything is validated before a caller allocates anything: config fields and numbers, tensors
    finite, and (check_ranks) ranks the file can hold."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist (or is not a directory)")

    def read(where) -> tuple:
        config_bytes = where(CONFIG_NAME).read_bytes() if with_config else b""
        record_bytes = read_optional(where(MINILORA_CONFIG_NAME))
        named = _json_or_none(record_bytes)
        candidates = [named["weights"]] if isinstance(named, dict) and named.get("weights") in WEIGHT_NAMES else []
        for name in dict.fromkeys([*candidates, *WEIGHT_NAMES]):
            if where(name).is_file():
                return (config_bytes, record_bytes, name, *_load_weights(where(name), directory / name))
        raise FileNotFoundError(directory / WEIGHTS_NAME)

    try:
        config_bytes, record_bytes, weights_name, tensors, generation = read_stable(directory, read,
                                                                                    MINILORA_CONFIG_NAME)
    except FileNotFoundError as err:
        missing = Path(err.filename or err.args[0]).name
        raise FileNotFoundError(f"{directory / missing} is missing: an adapter directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})") from None
    _check_finite(tensors, directory / weights_name)
    if not with_config:
        return None, tensors
    record = _record_for(_json_or_none(record_bytes), config_bytes, directory / weights_name, generation)
    config = _parse_config(config_bytes, directory / CONFIG_NAME, record)
    return config, tensors


def read_tensors(directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The adapter's tensors (see read_adapter)."""
    return read_adapter(directory, with_config=False)[1]


def read_config_file(path: Union[str, Path]) -> LoraConfig:
    """A LoraConfig from JSON: an adapter_config.json (minilora's or PEFT's) or LoraConfig's own fields."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such config file: {path}") from None
    record = None
    if path.name == CONFIG_NAME:  # minilora's own record beside it, if it belongs to this very file
        record = _record_for(_json_or_none(read_optional(path.parent / MINILORA_CONFIG_NAME)), data, path, None)
    return _parse_config(data, path, record)


def _json_or_none(data: Union[bytes, None]):
    try:
        return json.loads(data) if data is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _record_for(record, config_bytes: bytes, weights_path: Path, generation):
    """minilora's record, if it belongs to this adapter_config.json; else None (the config changed
    since: PEFT saved over the directory, or someone edited it). Weights that carry another save's
    generation than the record names were put beside it by hand: refused, never mixed."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None  # damaged or absent: adapter_config.json alone describes the adapter, for PEFT and for us
    if record.get("adapter_config_sha256") != hashlib.sha256(config_bytes).hexdigest():
        return None
    if generation is not None and record.get("generation") not in (None, generation):
        raise ValueError(f"{weights_path} was written by another save than {MINILORA_CONFIG_NAME} beside it "
                         "(files copied in from elsewhere?): the directory mixes two adapters; save it again")
    return record


def _parse_config(data: bytes, path: Path, record) -> LoraConfig:
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged: save the adapter again") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} describes a {kind} adapter, not LoRA; minilora loads LoRA adapters only")
    try:
        if record is not None:
            return _from_minilora(record["config"], path)
        if "minilora" in raw:  # written by an earlier minilora, inside adapter_config.json
            return _from_minilora(raw["minilora"]["config"], path)
        if "peft_type" in raw:
            return _from_peft(raw, path)
        return _from_minilora(raw, path)
    except (TypeError, ValueError, KeyError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {err}") from None


def _from_minilora(raw: dict, path: Path) -> LoraConfig:
    unknown = sorted(set(raw) - LoraConfig.field_names())
    if unknown:
        raise ValueError(f"{path}: unknown LoraConfig field(s) {', '.join(unknown)}; the fields are "
                         f"{', '.join(sorted(LoraConfig.field_names()))}")
    stored = dict(raw)
    ranks = stored.get("component_ranks", {})
    if not isinstance(ranks, dict):
        raise TypeError(f"component_ranks must be a mapping, got {ranks!r}")
    stored["component_ranks"] = {k: tuple(v) for k, v in ranks.items()}
    return LoraConfig(**stored)


def _from_peft(raw: dict, path: Path) -> LoraConfig:
    known = {f.name for f in fields(LoraConfig)} - {"layer_bands", "component_ranks"}
    unsupported = [k for k, default in _PEFT_DEFAULTS.items() if k in raw and raw[k] not in (default, None, {}, False)]
    if unsupported:
        raise ValueError(f"{path} uses {', '.join(unsupported)}, which minilora does not implement")
    unknown = sorted(set(raw) - known - set(_PEFT_DEFAULTS) - _PEFT_INERT)
    if unknown:
        warnings.warn(f"{path}: ignoring config keys minilora does not know: {', '.join(unknown)}", stacklevel=3)
    return LoraConfig(**{k: v for k, v in raw.items() if k in known})


def _load_weights(path: Path, shown: Path) -> tuple[dict[str, torch.Tensor], Union[str, None]]:
    """(tensors, the generation minilora wrote into a safetensors header, or None) from `path`.
    A missing file propagates FileNotFoundError; damage is a ValueError naming the file as the user
    knows it, `shown`. safetensors opens the file twice (header, then map): a save that renames a new
    file in between reads as damage here, and read_stable, seeing the directory moved, reads again."""
    try:
        if path.name == WEIGHTS_NAME:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, (f.metadata() or {}).get(GENERATION_KEY)
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise ValueError(
            f"{shown} cannot be read safely: it holds objects other than tensors, and minilora never unpickles "
            "those; save the adapter again as safetensors"
        ) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, UnicodeDecodeError) as err:
        if not path.exists():  # moved away by a save between finding it and opening it (safetensors says
            raise FileNotFoundError(path) from None  # so in its own error type): read_stable looks again
        raise ValueError(
            f"{shown} cannot be read safely: it is damaged (truncated or corrupted: "
            f"{str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); save the adapter again"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{shown} holds a {type(tensors).__name__}, not a dict of named tensors as PEFT writes: "
                         "it is not an adapter's weights file; save the adapter again")
    return tensors, None


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(sorted(bad)[:4])}"
                         f"{' …' if len(bad) > 4 else ''}); the adapter would compute garbage. Was training diverging "
                         "when it was saved? Save it again from a good checkpoint")


def check_ranks(config: LoraConfig, tensors: dict[str, torch.Tensor], directory) -> None:
    """Before any layer is allocated: the config's ranks are ones the file's tensors can hold. A
    config that says r = 1,000,000 beside rank-8 tensors would otherwise allocate gigabytes first."""
    file_ranks = [t.shape[0] for key, t in tensors.items()
                  if t.dim() == 2 and key.endswith(("lora_A.weight", "lora_embedding_A"))]
    if not file_ranks:
        return
    configured = [config.r, *config.rank_pattern.values(), *(r for r, _ in config.component_ranks.values()),
                  *(b.r for b in config.layer_bands or ())]
    if max(configured) > max(file_ranks):
        raise ValueError(f"{directory}: the config asks for rank {max(configured)} but the largest rank in the "
                         f"weights file is {max(file_ranks)}: the config and the weights do not belong together; "
                         "save the adapter again")


@torch.no_grad()
def fill_adapter(modules: AdapterModules, name: str, use_rslora: bool, biases: dict[str, nn.Parameter],
                 tensors: dict[str, torch.Tensor], directory: Union[str, Path]) -> None:
    """Copy a file's `tensors` into adapter `name`, freshly created on `modules`, and into the base
    `biases` it trains. Every key and shape is checked before anything is written."""
    tensors = {k.removesuffix(".weight") if k.endswith(f".{MAGNITUDE}.weight") else k: v for k, v in tensors.items()}
    tables = _embedding_tables(modules, tensors, directory)
    expected, _ = adapter_tensors(modules, name, use_rslora, biases)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise ValueError(
            f"{directory} does not fit this model: "
            + (f"keys matching no module: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}. " if unexpected else "")
            + (f"adapted modules with no tensor: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}. " if missing else "")
            + "Was it saved for another base model?"
        )
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ValueError(
                f"{directory}: {key} has shape {tuple(tensors[key].shape)} in the file but {tuple(value.shape)} "
                "in this model; the adapter was saved for a different base model"
            )
    for path, module in modules.items():
        key = f"{PREFIX}{path}."
        own = {k[len(key):]: t for k, t in tensors.items() if k.startswith(key) and k in expected}
        module.load_file_tensors(name, own, use_rslora, f"{directory}: {path}")
    for path, param in biases.items():
        param.copy_(tensors[PREFIX + path])  # the base's own bias: shared by every adapter, as in PEFT
    for path, table in tables.items():
        modules[path].base_layer.weight.copy_(table)


def _embedding_tables(modules: AdapterModules, tensors: dict[str, torch.Tensor], directory) -> dict[str, torch.Tensor]:
    """Take out of `tensors` the whole embedding tables PEFT saves beside an adapted embedding
    (`<path>.base_layer.weight`, when the target is named embed_tokens or lm_head, in case the
    vocabulary was resized). Loading puts them into the base embedding, as PEFT does."""
    tables = {}
    for path, module in modules.items():
        table = tensors.pop(f"{PREFIX}{path}.base_layer.weight", None)
        if table is not None and module.accepts_saved_table(table, f"{directory}: {path}"):
            tables[path] = table
    return tables
