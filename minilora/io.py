"""Adapter files in PEFT's format, both ways: what minilora saves PEFT loads, and the other way round.

    <dir>/adapter_config.json          PEFT's field names, plus a "minilora" key PEFT ignores
    <dir>/adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, d_in)
                                       base_model.model.<module path>.lora_B.weight   (d_out, r)
                                       base_model.model.<module path>.<param>         modules_to_save
    <dir>/<name>/...                   every adapter other than "default", as PEFT does

Sliced adapters. PEFT has no slices, so an adapter on the Q and V parts of a fused layer is
written as one LoRA of rank r_q + r_v over the whole fused output, which computes the same thing:

    A = [ A_q ]   (r_q + r_v, d_in)        B = [ B_q   0  ]  rows of q      (d_out, r_q + r_v)
        [ A_v ]                                [  0    0  ]  rows of k: zero, K stays untouched
                                               [  0   B_v ]  rows of v

    B·A = [B_q A_q ; 0 ; B_v A_v]. The scale must not change: with α/r scaling, α doubles with r.

The "minilora" key keeps the original config (roles, bands), so minilora reads slices back as
slices. Writes are atomic: each file goes to a temporary name in the same directory, is fsynced,
then renamed over the old one. Nothing in an adapter directory is ever executed: tensors come from
safetensors, or from `adapter_model.bin` through `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LoraConfig
from .lora import FULL, LoRALinear
from .surgery import TASK_HEADS, ModulesToSave, has_module

if TYPE_CHECKING:
    from .model import LoraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
TASK_HEAD_NAMES = {name for heads in TASK_HEADS.values() for name in heads}

# PEFT fields minilora does not implement: ignored when they hold their default, refused otherwise.
_PEFT_DEFAULTS = {
    "use_dora": False, "lora_bias": False, "layer_replication": None, "loftq_config": {},
    "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
    "use_qalora": False, "use_bdlora": None, "eva_config": None, "corda_config": None,
    "arrow_config": None, "kasa_config": None, "lora_ga_config": None, "monteclora_config": None,
    "velora_config": None, "megatron_config": None,
}
# PEFT fields with no effect on the weights or on which modules are adapted.
_PEFT_INERT = {"auto_mapping", "revision", "peft_version", "megatron_core", "qalora_group_size",
               "ensure_weight_tying", "layers_pattern_type"}


# ---------------------------------------------------------------------------- atomic writes
def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same directory, fsync, rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; other systems skip this step)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------- model -> files
def _export_scale(layer: LoRALinear, name: str, r_total: int, rslora: bool) -> tuple[float, float]:
    """(alpha, scale) of the exported single LoRA: same scale as the first part, rank r_total."""
    first = next(iter(layer.spans[name]))
    scale = layer.scaling[name][first]
    alpha = layer.lora_alpha[name][first] if r_total == layer.r[name][first] else (
        scale * math.sqrt(r_total) if rslora else scale * r_total)
    return alpha, scale


def _export_layer(layer: LoRALinear, name: str, rslora: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One LoRA over the whole output, equal to the layer's parts: (A, B, r, alpha)."""
    A_parts = [layer.lora_A[name][p].weight.detach() for p in layer.spans[name]]  # (r_p, d_in) each
    if list(layer.spans[name]) == [FULL]:
        return A_parts[0], layer.lora_B[name][FULL].weight.detach(), layer.r[name][FULL], layer.lora_alpha[name][FULL]
    A = torch.cat(A_parts)  # (Σ r_p, d_in)
    r_total = A.shape[0]
    alpha, scale = _export_scale(layer, name, r_total, rslora)
    B = torch.zeros(layer.out_features, r_total, dtype=A.dtype)  # (d_out, Σ r_p): zero outside the parts
    offset = 0
    for part, (first, end) in layer.spans[name].items():
        r = layer.r[name][part]
        ratio = layer.scaling[name][part] / scale  # 1.0 unless parts differ in scale
        B[first:end, offset:offset + r] = layer.lora_B[name][part].weight.detach() * ratio
        offset += r
    return A, B, r_total, alpha


def _trained_biases(model: "LoraModel", bias: str) -> dict[str, torch.nn.Parameter]:
    """The biases an adapter trains, by parameter path: PEFT keeps `.base_layer.` in their keys."""
    if bias == "none":
        return {}
    owners = {f"{p}.base_layer.bias" for p, m in model.model.named_modules() if isinstance(m, LoRALinear)}
    return {
        path: param for path, param in model.model.named_parameters()
        if path.endswith("bias") and "lora_" not in path and ".modules_to_save." not in path
        and ".original_module." not in path and (bias == "all" or path in owners)
    }


def adapter_state_dict(model: "LoraModel", name: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """The adapter's tensors under PEFT's keys, and (r, alpha) per adapted module as exported."""
    tensors, ranks = {}, {}
    bias, rslora = model.peft_config[name].bias, model.peft_config[name].use_rslora
    for path, module in model.model.named_modules():
        if isinstance(module, LoRALinear) and name in module.lora_A:
            A, B, r, alpha = _export_layer(module, name, rslora)
            tensors[f"{PREFIX}{path}.lora_A.weight"] = A
            tensors[f"{PREFIX}{path}.lora_B.weight"] = B
            ranks[path] = (r, alpha)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for param, value in module.modules_to_save[name].state_dict().items():
                tensors[f"{PREFIX}{path}.{param}"] = value.detach()
    for path, param in _trained_biases(model, bias).items():
        tensors[PREFIX + path] = param.detach()
    return {k: v.contiguous() for k, v in tensors.items()}, ranks


def peft_config_dict(model: "LoraModel", name: str, ranks: dict[str, tuple[int, float]]) -> dict:
    """The config PEFT reads. Roles, slices and bands become explicit module paths and patterns."""
    config = model.peft_config[name]
    out = {k: v for k, v in config.to_dict().items() if k not in ("layer_bands", "component_ranks")}
    if not out["base_model_name_or_path"]:
        out["base_model_name_or_path"] = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    out["inference_mode"] = True
    sliced = {p: list(m.spans[name]) for p, m in model.model.named_modules()
              if isinstance(m, LoRALinear) and name in m.spans and list(m.spans[name]) != [FULL]}
    plain = not sliced and config.layer_bands is None and not config.component_ranks and _peft_names_only(model, config)
    if not plain:
        # Explicit: every adapted module by its full path, and its exported rank/alpha.
        r0, a0 = next(iter(ranks.values()))
        out.update(r=r0, lora_alpha=a0, target_modules=sorted(ranks), layers_to_transform=None,
                   layers_pattern=None, exclude_modules=None)
        out["rank_pattern"] = {_exact(p): r for p, (r, a) in ranks.items() if r != r0}
        out["alpha_pattern"] = {_exact(p): a for p, (r, a) in ranks.items() if a != a0}
    out["minilora"] = {"config": config.to_dict(), "sliced": sliced}
    return out


def _exact(path: str) -> str:
    """A rank_pattern key (a regex in PEFT) that matches exactly this module path."""
    return path.replace(".", r"\.")


def _peft_names_only(model: "LoraModel", config: LoraConfig) -> bool:
    """True when target_modules means the same to PEFT as to minilora (no role names)."""
    from .roles import family_of, parse_selector

    targets = config.target_modules
    if targets is None or isinstance(targets, str):
        return True
    return family_of(model.model) is None or all(parse_selector(t) is None or _is_module_name(model, t) for t in targets)


def _is_module_name(model: "LoraModel", key: str) -> bool:
    return any(n == key or n.endswith("." + key) for n, _ in model.model.named_modules())


def save_adapters(model: "LoraModel", directory: Union[str, Path], selected_adapters: Optional[list[str]] = None) -> None:
    """Write each adapter: "default" into `directory`, any other into `directory/<name>`."""
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    model._check_exists(names)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; pick another path")
    for name in names:
        target = directory if name == "default" else directory / name
        tensors, ranks = adapter_state_dict(model, name)
        config = peft_config_dict(model, name, ranks)
        # weights first: a reader never sees a config that promises tensors the file lacks
        atomic_write(target / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(target / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))


# ---------------------------------------------------------------------------- files -> model
def read_config(directory: Union[str, Path]) -> LoraConfig:
    """The LoraConfig in `directory`, from a minilora or a PEFT adapter_config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist (or is not a directory)")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return read_config_file(path)


def read_config_file(path: Union[str, Path]) -> LoraConfig:
    """A LoraConfig from JSON: an adapter_config.json (minilora's or PEFT's) or LoraConfig's own fields."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such config file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged: save the adapter again") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} describes a {kind} adapter, not LoRA; minilora loads LoRA adapters only")
    if "minilora" in raw:
        raw = raw["minilora"]["config"]
    elif "peft_type" in raw:
        return _from_peft(raw, path)
    unknown = sorted(set(raw) - LoraConfig.field_names())
    if unknown:
        raise ValueError(f"{path}: unknown LoraConfig field(s) {', '.join(unknown)}; the fields are "
                         f"{', '.join(sorted(LoraConfig.field_names()))}")
    stored = dict(raw)
    stored["component_ranks"] = {k: tuple(v) for k, v in stored.get("component_ranks", {}).items()}
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


def read_tensors(directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The adapter's tensors; safetensors, or a .bin through torch.load(weights_only=True)."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    try:
        if path.is_file():
            return load_file(path)
        legacy = directory / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            path = legacy
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} cannot be read safely: it holds objects other than tensors, and minilora never unpickles "
            "those; save the adapter again as safetensors"
        ) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read safely: it is damaged (truncated or corrupted: "
            f"{str(err).splitlines()[0][:160]}); save the adapter again"
        ) from None
    raise FileNotFoundError(f"{path} is missing (no {LEGACY_WEIGHTS_NAME} either) in {directory}")


def load_adapter(model: "LoraModel", directory: Union[str, Path], adapter_name: str, is_trainable: bool = False) -> None:
    """Add adapter `adapter_name` from `directory` to `model`; the others are left untouched."""
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or load under another name")
    config = read_config(directory)
    config.inference_mode = not is_trainable
    if config.modules_to_save:  # PEFT lists every task head it might add, "score" on BERT included
        config.modules_to_save = [m for m in config.modules_to_save if m not in TASK_HEAD_NAMES or has_module(model.model, m)]
    tensors = read_tensors(directory)
    model.add_adapter(adapter_name, config)
    try:
        _fill(model, adapter_name, tensors, Path(directory))
    except BaseException:
        model.delete_adapter(adapter_name)  # all or nothing
        raise
    model._apply_active()


@torch.no_grad()
def _fill(model: "LoraModel", name: str, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected, _ = adapter_state_dict(model, name)
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
    rslora = model.peft_config[name].use_rslora
    for path, module in model.model.named_modules():
        if isinstance(module, LoRALinear) and name in module.lora_A:
            A, B = tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"]
            _import_layer(module, name, A, B, path, rslora)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            copy = module.modules_to_save[name]
            copy.load_state_dict({p: tensors[f"{PREFIX}{path}.{p}"] for p in copy.state_dict()})
    for path, param in _trained_biases(model, model.peft_config[name].bias).items():
        param.copy_(tensors[PREFIX + path])  # the base's own bias: shared by every adapter, as in PEFT


def _import_layer(layer: LoRALinear, name: str, A: torch.Tensor, B: torch.Tensor, path: str, rslora: bool) -> None:
    """The inverse of `_export_layer`: split one whole-layer LoRA back into the layer's parts."""
    if list(layer.spans[name]) == [FULL]:
        layer.lora_A[name][FULL].weight.copy_(A)
        layer.lora_B[name][FULL].weight.copy_(B)
        return
    _, scale = _export_scale(layer, name, A.shape[0], rslora)
    covered = torch.zeros(B.shape, dtype=torch.bool)
    offset = 0
    for part, (first, end) in layer.spans[name].items():
        r = layer.r[name][part]
        layer.lora_A[name][part].weight.copy_(A[offset:offset + r])
        layer.lora_B[name][part].weight.copy_(B[first:end, offset:offset + r] * (scale / layer.scaling[name][part]))
        covered[first:end, offset:offset + r] = True
        offset += r
    if B[~covered].abs().max() > 0:
        raise ValueError(
            f"{path}: lora_B has non-zero entries outside the slices the config names (e.g. K's rows), so it "
            "cannot load as slices without changing the model; load it with target_modules set to the module name"
        )
