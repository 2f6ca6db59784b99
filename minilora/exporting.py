r"""Export for deployment: merge an adapter into its base, optionally prune, write a Hugging Face
model directory that transformers loads as it is.

    report = export("base_dir", adapter="adapter_dir", out="deploy", sparsity=0.5, pattern="2:4", format="nf4")
    minilora export --model base_dir --adapter adapter_dir --out deploy --sparsity 0.5 --pattern 2:4 --format nf4

The pruning settings (sparsity, pattern, method, scope) have prune()'s names (pruning.py), and the
written format is the report's `format`.

Steps:
    1. load the base (a 4-bit bitsandbytes checkpoint is read as it is), check that the adapter fits it
    2. merge: W' = Ŵ + (α/r)·B·A, with Ŵ the dequantized weight of a 4-bit base (what the adapter
       was trained against)
    3. prune (pruning.py), if asked
    4. write: fp32 / bf16 weights, or ("nf4") the merged linear layers in NF4 + double quant as a
       pre-quantized bitsandbytes 4-bit checkpoint (bnb_format.py), the output head kept as it is
    5. the report: sizes before / after, bits per linear weight, sparsity, quality (mean loss on the
       evaluation batches at each step), printed as a table and saved as <out>/export_report.json

The directory is written whole or not at all: everything goes into a hidden sibling
`.<out>.partial-*`, which is renamed to `<out>` only when complete. An existing model directory
is refused unless `overwrite`; then it is replaced in one rename, and the old one removed after.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from . import hf_dir, renamed
from .files import give_default_mode, sync_directory
from .model import LoraModel
from .pruning import PruneReport, prune
from .quant import Linear4bit, NF4Config, load_quantized
from .quant import bnb_format
from .roles import features, is_linear

FORMATS = ("fp32", "bf16", "nf4")


@dataclass
class ExportReport:
    """What an export wrote and what each step cost."""

    out: str  # the model directory written
    format: str  # "fp32" | "bf16" | "nf4"
    bytes_before: int  # the merged model's parameters in fp32
    bytes_after: int  # the model file(s) written
    linear_weights: int  # weights of the linear layers (the ones pruned / quantized)
    bits_per_linear_weight: float  # bits each stores in the written file (codes and scales, or dtype)
    sparsity: Optional[float]  # zeros among the pruned layers' weights; None when not pruned
    loss: dict = field(default_factory=dict)  # step ("adapter", "merged", "pruned", "exported") -> mean loss
    prune: Optional[dict] = None  # the pruning report (pruning.py), per layer

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = ["| | |", "|---|---|", f"| format | {self.format} |",
                f"| size before (fp32) | {self.bytes_before / 2**20:.2f} MiB |",
                f"| size after | {self.bytes_after / 2**20:.2f} MiB ({self.bytes_after / self.bytes_before:.3f}×) |",
                f"| bits per linear weight | {self.bits_per_linear_weight:.3f} |",
                f"| sparsity | {'—' if self.sparsity is None else f'{self.sparsity:.3f}'} |"]
        rows += [f"| loss: {step} | {value:.4f} |" for step, value in self.loss.items()]
        return "\n".join(rows)


# ---------------------------------------------------------------------------- checks
def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over a model directory (unless `overwrite`) or into a non-empty other one."""
    if hf_dir.looks_like_model_dir(out) and not overwrite:
        raise FileExistsError(f"{out} already holds a model; pass --overwrite (overwrite=True) to replace it, "
                              "or choose another output directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not hf_dir.looks_like_model_dir(out):
        raise FileExistsError(f"{out} is a non-empty directory that holds no model; export writes a whole model "
                              "directory: choose an empty or new one")


def check_adapter_fits(base: nn.Module, adapter_dir: Path) -> None:
    """Each LoRA factor of the adapter must sit on a layer of the base with matching sizes; the first
    that does not is named with both shapes."""
    from safetensors import safe_open

    files = [adapter_dir / "adapter_model.safetensors"]
    if not files[0].is_file():
        return  # a .bin adapter: LoraModel.from_pretrained checks it as it loads
    with safe_open(files[0], framework="pt") as f:
        for key in sorted(f.keys()):
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            shape = tuple(f.get_slice(key).get_shape())
            path = key.split(".lora_")[0].removeprefix("base_model.model.")
            try:
                layer = base.get_submodule(path)
            except AttributeError:
                raise ValueError(f"adapter key {key} names module {path!r}, which the base model does not have: the "
                                 "adapter was trained on another model") from None
            if not is_linear(layer):
                continue  # embeddings and other kinds: checked by LoraModel as it loads
            d_in, d_out = features(layer)
            wanted = d_in if ".lora_A." in key else d_out
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != wanted:
                side = "inputs" if ".lora_A." in key else "outputs"
                raise ValueError(f"the adapter does not fit this base: {key} has shape {shape}, but {path} has "
                                 f"weight shape (out, in) = {(d_out, d_in)} ({wanted} {side}); export the adapter "
                                 "with the base model it was trained on")


# ---------------------------------------------------------------------------- steps
def load_base(model_dir: Union[str, Path], model_class=None) -> nn.Module:
    """A Hugging Face causal LM from a directory; a 4-bit bitsandbytes checkpoint is read without re-quantizing."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not hf_dir.has_config(model_dir):
        raise FileNotFoundError(f"{model_dir / hf_dir.CONFIG_FILE} is missing: --model needs a Hugging Face model "
                                "directory")
    model_class = model_class or AutoModelForCausalLM
    if bnb_format.is_prequantized(json.loads((model_dir / hf_dir.CONFIG_FILE).read_text())):
        return load_quantized(model_dir, model_class=model_class)
    return model_class.from_pretrained(model_dir).eval()


def mean_loss(model: nn.Module, batches: Optional[list]) -> Optional[float]:
    """Mean next-token loss over batches (input_ids tensors or dicts of model inputs)."""
    if not batches:
        return None
    losses = []
    with torch.no_grad():
        for batch in batches:
            inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
            labels = inputs.get("labels", inputs["input_ids"])
            losses.append(model(**{**inputs, "labels": labels}).loss.float().item())
    return sum(losses) / len(losses)


def untie_in_config(model: nn.Module) -> None:
    """A head trained apart from the embeddings (untied by LoraModel) must not be tied again on load."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embeddings is None or head.weight is embeddings.weight:
        return
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def dequantize_all(model: nn.Module) -> None:
    """Every Linear4bit back to the Linear / Conv1D it came from, holding its dequantized weight."""
    for name in [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(name).to_float())


def quantize_for_export(model: nn.Module, config: NF4Config, progressbar: bool) -> None:
    """NF4 + double quant on every linear layer but the output head (and the modules the model class
    keeps in fp32), in place, one layer at a time under a progress bar."""
    head = model.get_output_embeddings()
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    names = [name for name, m in model.named_modules()
             if is_linear(m) and m is not head and not any(name == k or name.endswith("." + k) for k in keep)]
    if progressbar:
        from tqdm.auto import tqdm
        names = tqdm(names, desc="nf4", unit="layer", leave=False, disable=None)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Linear4bit.from_float(model.get_submodule(name), config))


def nf4_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in bitsandbytes' serialized 4-bit layout; tied tensors stored once."""
    tensors, seen = {}, set()
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    for name, layer in quantized.items():
        tensors.update(bnb_format.layer_tensors(name, layer))
    for key, value in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in quantized or value.data_ptr() in seen:
            continue  # quantized above, or tied to a tensor already written (the LM head)
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    return tensors


def write_model(model: nn.Module, directory: Path, format: str, source_dir: Optional[Path]) -> None:
    """config.json + model.safetensors (+ tokenizer files from the source) into `directory`."""
    from safetensors.torch import save_file

    if hasattr(model.config, "quantization_config"):  # a 4-bit source's: the weights written say what they are
        del model.config.quantization_config
    if format == "nf4":
        config = model.config.to_dict()
        compute = next((m.config.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)), None)
        skipped = [n.rpartition(".")[2] for n, m in model.named_modules() if is_linear(m) and not isinstance(m, Linear4bit)]
        config["quantization_config"] = bnb_format.quantization_config(
            double_quant=True, compute_dtype=compute or torch.float32, skip_modules=sorted(set(skipped)))
        save_file(nf4_state_dict(model), directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    else:
        model.save_pretrained(directory, safe_serialization=True)
    for path in hf_dir.companion_files(source_dir) if source_dir else ():
        if not (directory / path.name).exists():
            shutil.copy2(path, directory / path.name)


def publish(partial: Path, out: Path) -> None:
    """Rename the complete `partial` directory to `out`; an existing `out` is moved aside first and
    removed after, so at every moment `out` is either the old model or the new one."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "model")
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old)
    sync_directory(out.parent)  # make the renames durable


# export's earlier keywords, kept for one release: {earlier name: name now}
EARLIER_KEYWORDS = {"prune": "sparsity", "prune_method": "method", "prune_scope": "scope", "fmt": "format",
                    "progress": "progressbar"}


def export(model: Union[str, Path, nn.Module], adapter: Union[str, Path, None] = None, out: Union[str, Path] = "",
           sparsity: Optional[float] = None, pattern: str = "unstructured", method: str = "magnitude",
           scope: str = "layer", format: str = "fp32", overwrite: bool = False,
           calibration: Optional[Iterable] = None, evaluation: Optional[Iterable] = None,
           progressbar: bool = True, print_report: bool = True, **earlier) -> ExportReport:
    """Merge, optionally prune, write a Hugging Face model directory at `out` (see the module docstring).

    model: a base model directory, a base nn.Module, or a LoraModel (then `adapter` may be None).
    sparsity, pattern, method, scope: prune()'s settings; sparsity None: no pruning.
    format: "fp32", "bf16" or "nf4" (a pre-quantized bitsandbytes 4-bit checkpoint).
    calibration: batches for Wanda and the pruning report; evaluation: batches whose mean loss the
    report gives after each step (the calibration batches when not given).
    earlier: prune=, prune_method=, prune_scope=, fmt=, progress= (the earlier names; FutureWarning)."""
    if earlier:
        now = dict(sparsity=sparsity, method=method, scope=scope, format=format, progressbar=progressbar)
        now.update(renamed.earlier_keywords("export", earlier, EARLIER_KEYWORDS))
        sparsity, method, scope, format, progressbar = (now[k] for k in ("sparsity", "method", "scope", "format",
                                                                         "progressbar"))
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not out:
        raise ValueError("give the output directory (out=, --out DIR)")
    out = Path(out)
    check_out(out, overwrite)
    calibration = list(calibration) if calibration is not None else None
    evaluation = list(evaluation) if evaluation is not None else calibration
    source_dir = Path(model) if isinstance(model, (str, Path)) else None
    base = load_base(model) if source_dir else model
    losses = {}
    if adapter is not None:
        if isinstance(base, LoraModel):
            raise ValueError("pass either a LoraModel or a base model with adapter=, not both")
        check_adapter_fits(base, Path(adapter))
        base = LoraModel.from_pretrained(base, adapter)
    if isinstance(base, LoraModel):
        base.eval()
        losses["adapter"] = mean_loss(base, evaluation)
        merged = base.merge_and_unload(progressbar=progressbar)
    else:
        merged = base
    dequantize_all(merged)  # the 4-bit layers without LoRA: pruning and writing start from full precision
    untie_in_config(merged)
    merged.eval()
    losses["merged"] = mean_loss(merged, evaluation)
    bytes_before = sum(p.numel() * 4 for p in {id(p): p for p in merged.parameters()}.values())
    pruned: Optional[PruneReport] = None
    if sparsity is not None:
        pruned = prune(merged, sparsity=sparsity, method=method, pattern=pattern, scope=scope,
                       calibration=calibration, progressbar=progressbar)
        losses["pruned"] = mean_loss(merged, evaluation)
    linear = [m for m in merged.modules() if is_linear(m) and m is not merged.get_output_embeddings()]
    n_linear = sum(m.weight.numel() for m in linear)
    if format == "bf16":
        merged = merged.to(torch.bfloat16)
    elif format == "nf4":
        quantize_for_export(merged, NF4Config(blocksize=64, double_quant=True), progressbar)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    give_default_mode(partial)  # 0755 under umask 022, not mkdtemp's 0700: others may serve the model
    try:
        write_model(merged, partial, format, source_dir)
        bytes_after = sum(f.stat().st_size for f in partial.glob("*.safetensors"))
        if format == "nf4":
            stored = sum(m.weight.numel() + m.state.nbytes() for m in merged.modules() if isinstance(m, Linear4bit))
            bits = 8 * stored / n_linear
        else:
            bits = 16.0 if format == "bf16" else 32.0
        if evaluation:
            reloaded = load_base(partial)
            losses["exported"] = mean_loss(reloaded.float() if format == "bf16" else reloaded, evaluation)
        report = ExportReport(str(out), format, bytes_before, bytes_after, n_linear, bits,
                              pruned.sparsity_reached if pruned else None,
                              {k: v for k, v in losses.items() if v is not None},
                              pruned.to_dict() if pruned else None)
        (partial / "export_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        for path in partial.rglob("*"):  # transformers' writer leaves some files 0600
            give_default_mode(path)
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if print_report:
        print(report.table())
    return report
