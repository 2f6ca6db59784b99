"""Routing requests to adapters, three ways: prompt tags (`TagRouter`), a learned router that mixes
the adapters inside one forward pass (`LoraRouter`), and a classifier cascade (`Cascade`).

Prompt tags: a text that starts with a tag such as `<domain=medical>` is served by adapter
"medical"; the batch then runs as one mixed batch.

    router = TagRouter(adapters=["finance", "medical"], default="__base__")
    names, texts = router.route(["<domain=medical> What is…", "Hello"])   # ["medical", "__base__"]
    model.generate(**tokenizer(texts, ...), adapter_names=names)

Keeping the tag in the text (`strip=False`) is how the article's "prefix" adapters are trained:
the model sees the tag it was trained with.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import mixing
from .files import atomic_write, read_json_object
from .mixing import BASE


@dataclass
class TagRouter:
    """Picks an adapter per text from a leading tag."""

    adapters: list[str]  # the adapters a tag may name
    pattern: str = r"^\s*<domain=(?P<name>[\w.-]+)>\s*"  # regex with a group named "name"
    strip: bool = True  # remove the tag from the text the model sees
    default: str = BASE  # adapter for a missing or unknown tag ("__base__": no adapter)
    _regex: re.Pattern = field(init=False, repr=False)

    def __post_init__(self):
        self._regex = re.compile(self.pattern)
        if "name" not in self._regex.groupindex:
            raise ValueError(f"the tag pattern needs a group named 'name', e.g. {TagRouter.pattern!r}")
        if self.default != BASE and self.default not in self.adapters:
            raise ValueError(f"default {self.default!r} is not one of the adapters {self.adapters} (or '{BASE}')")

    def save(self, path) -> None:
        """Write this router as JSON (atomically): its adapters, tag pattern, strip and default."""
        config = {"adapters": list(self.adapters), "pattern": self.pattern, "strip": self.strip, "default": self.default}
        atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))

    @classmethod
    def load(cls, path) -> "TagRouter":
        """The router `save` wrote: a routing.json, or the folder that holds it (a run's <out>/adapters)."""
        path = Path(path)
        path = path / "routing.json" if path.is_dir() else path
        config = read_json_object(path, "a tag router's config", "write it with TagRouter.save", ValueError)
        unknown = sorted(config.keys() - {"adapters", "pattern", "strip", "default"})
        if unknown or not isinstance(config.get("adapters"), list):
            raise ValueError(f"{path}: a tag router's config has a list 'adapters' and optionally 'pattern', 'strip' "
                             f"and 'default'{f'; unknown keys {unknown}' if unknown else ''}")
        return cls(**config)

    def route(self, texts: list[str]) -> tuple[list[str], list[str]]:
        """(adapter name per text, the texts as the model should see them)."""
        names, out = [], []
        for text in texts:
            match = self._regex.match(text)
            name = match.group("name") if match else None
            if name is None:
                warnings.warn(f"no tag in {text[:40]!r}: using {self.default!r}", stacklevel=2)
            elif name not in self.adapters:
                warnings.warn(f"unknown tag {name!r} (adapters: {self.adapters}): using {self.default!r}", stacklevel=2)
            names.append(name if name in self.adapters else self.default)
            out.append(text[match.end():] if match and self.strip else text)
        return names, out


def _unit_rms(features: torch.Tensor) -> torch.Tensor:
    """Features rescaled to unit root-mean-square: the router's learning rate then does not depend
    on the scale of the base's activations (embeddings of 0.02, residual streams of 10)."""
    return features / features.square().mean(-1, keepdim=True).sqrt().clamp(min=1e-12)


class LoraRouter(nn.Module):
    r"""A learned router (mixture of LoRA): softmax over adapters from pooled base features.

        features = mean over tokens of the output of `feature_module` (default: the input
                   embeddings), which the frozen base computes before any adapted layer,
                   rescaled to unit RMS
        p = softmax(features · Wᵀ + b)        (B, n) per sequence, or (B, T, n) per token
        y = x W₀ᵀ + Σ_a p_a · s_a (x A_aᵀ) B_aᵀ in every adapted layer after it

    One forward pass: a hook on `feature_module` computes p from the base's own activations and
    the rest of the pass mixes the adapters' low-rank paths; no second pass. `top_k` keeps the k
    largest weights per row (renormalized). Trained with the adapters frozen (`fit`), with a
    load-balancing term n · Σ_a f_a · P_a (f: share of rows whose top choice is a; P: mean weight).
    """

    def __init__(self, model, adapters: list[str], feature_module: Optional[str] = None,
                 per_token: bool = False, top_k: Optional[int] = None):
        super().__init__()
        unknown = [a for a in adapters if a not in model.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; available adapters: {sorted(model.peft_config)}")
        self.adapters = list(adapters)
        self.feature_module = feature_module
        self.per_token, self.top_k = per_token, top_k
        module = self._module(model)
        width = module.embedding_dim if isinstance(module, nn.Embedding) else model.config.hidden_size
        self.proj = nn.Linear(width, len(adapters))

    def _module(self, model) -> nn.Module:
        base = model.get_base_model()
        return base.get_submodule(self.feature_module) if self.feature_module else base.get_input_embeddings()

    def logits(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, T, d) features -> (B, n) logits, or (B, T, n) per token."""
        hidden = hidden.float()
        if self.per_token:
            return self.proj(_unit_rms(hidden))
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask.float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, d)
        return self.proj(_unit_rms(pooled))

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(-1)
        if self.top_k is not None and self.top_k < p.shape[-1]:
            kth = p.topk(self.top_k, dim=-1).values[..., -1:]
            p = torch.where(p >= kth, p, torch.zeros_like(p))
            p = p / p.sum(-1, keepdim=True)
        return p

    @torch.no_grad()
    def features(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """The feature module's output for `input_ids`, from the base alone."""
        captured = {}
        module = self._module(model)
        handle = module.register_forward_hook(lambda m, i, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out))
        try:
            if isinstance(module, nn.Embedding):
                module(input_ids)
            else:
                with model.disable_adapter():
                    model(input_ids=input_ids)
        finally:
            handle.remove()
        return captured["h"]

    def forward(self, model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """Run `model` with the adapters mixed by this router: one pass. Adapted layers before the
        feature module run without adapters; those after it mix them by the router's weights."""
        mixture = mixing.Mixture(tuple(self.adapters))

        def route(module, inputs, out):
            hidden = out[0] if isinstance(out, tuple) else out
            mixture.weights = self.weights(self.logits(hidden, attention_mask))

        handle = self._module(model).register_forward_hook(route)
        try:
            with model.routed(mixing.Routing(mixture=mixture)):
                return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()

    def fit(self, model, input_ids: torch.Tensor, labels: torch.Tensor, steps: int = 200, lr: float = 1e-2,
            balance: float = 0.01, batch_size: int = 64, seed: int = 0) -> float:
        """Train the router on domain labels (indices into `adapters`); adapters stay frozen.
        Returns the training accuracy."""
        if labels.max() >= len(self.adapters) or labels.min() < 0:
            raise ValueError(f"labels must index the {len(self.adapters)} adapters {self.adapters}")
        feats = torch.cat([self.features(model, input_ids[i:i + batch_size]) for i in range(0, len(input_ids), batch_size)])
        opt = torch.optim.Adam(self.proj.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        n = len(self.adapters)
        for _ in range(steps):
            idx = torch.randint(0, len(feats), (min(batch_size, len(feats)),), generator=g)
            logits = self.logits(feats[idx], None)
            target = labels[idx] if not self.per_token else labels[idx].unsqueeze(1).expand(logits.shape[:2])
            p = logits.softmax(-1).reshape(-1, n)
            share = torch.nn.functional.one_hot(p.argmax(-1), n).float().mean(0)  # f_a
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n), target.reshape(-1))
            loss = loss + balance * n * (share * p.mean(0)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self.accuracy(model, input_ids, labels)

    @torch.no_grad()
    def predict(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """The top adapter index per sequence."""
        logits = self.logits(self.features(model, input_ids), None)
        return (logits.mean(1) if self.per_token else logits).argmax(-1)

    def accuracy(self, model, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(model, input_ids) == labels).float().mean().item()


class TextClassifier(nn.Module):
    """A small domain classifier for the cascade: hashed byte trigrams -> linear -> softmax."""

    def __init__(self, labels: list[str], buckets: int = 4096):
        super().__init__()
        self.labels, self.buckets = list(labels), buckets
        self.linear = nn.Linear(buckets, len(labels))

    def featurize(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.buckets)
        for i, text in enumerate(texts):
            data = text.lower().encode()
            for j in range(len(data) - 2):
                out[i, zlib.crc32(data[j:j + 3]) % self.buckets] += 1.0
            out[i] /= max(1, len(data) - 2)
        return out

    def fit(self, texts: list[str], labels: list[str], steps: int = 300, lr: float = 0.5) -> float:
        unknown = sorted(set(labels) - set(self.labels))
        if unknown:
            raise ValueError(f"labels {unknown} are not among {self.labels}")
        x, y = self.featurize(texts), torch.tensor([self.labels.index(label) for label in labels])
        opt = torch.optim.Adam(self.linear.parameters(), lr=lr / 10)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(self.linear(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (self.linear(x).argmax(-1) == y).float().mean().item()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.linear(self.featurize(texts)).argmax(-1).tolist()]


@dataclass
class Cascade:
    """Classify each text to an adapter (any callable, or a TextClassifier), then generate with it."""

    classify: Callable[[list[str]], list[str]]

    def generate(self, model, texts: list[str], encode: Callable[[list[str]], dict], **generate_kwargs):
        """(adapter names, model.generate output) for `texts`; `encode` turns texts into model inputs."""
        names = list(self.classify(texts))
        return names, model.generate(**encode(texts), adapter_names=names, **generate_kwargs)
