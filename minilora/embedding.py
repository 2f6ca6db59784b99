r"""LoraEmbedding: a frozen nn.Embedding plus low-rank adapters on its lookup table.

The table E (num_embeddings × d) maps a token id t to its row E[t]. LoRA adds a low-rank table:

    E' = E + s · (B A)ᵀ          A ∈ R^{r × num_embeddings},  B ∈ R^{d × r},  s = alpha / r
    y  = E[ids] + s · Aᵀ[ids] Bᵀ          (a lookup in Aᵀ, then one small matmul)

This is PEFT's convention for embeddings (`lora_embedding_A` (r, num_embeddings), `lora_embedding_B`
(d, r)): A's columns are indexed by token id, so the "input" of the low-rank path is a one-hot row.
A starts at zero and B ~ N(0, 1), so a fresh adapter changes nothing, bit for bit. Dropout does not
apply to a lookup (PEFT does not apply it either).

Tied LM head. GPT-2 (and other models with tie_word_embeddings) reads the same weight E in the
input lookup and in the head, logits = h Eᵀ. LoRA on the embedding adapts the input lookup only:
the head keeps reading the base E. Merging writes s·(B A)ᵀ into E itself, which the head shares,
so a merged model's head changes too (PEFT merges the same way); `merge` warns when that happens.

Shape legend: ids (...), d = embedding_dim, V = num_embeddings, r = rank.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import renamed
from .adapter_layer import AdapterLayer
from .roles import FULL, Site, walk

EMBEDDING = "embedding"  # the role of an embedding site: never picked by "all-linear" or role names


def embedding_sites(model: nn.Module, modules=None) -> dict[str, Site]:
    """A Site for every nn.Embedding (or LoraEmbedding) in `model`, keyed by module path.
    `modules`: the pairs of one `walk(model)`, when the caller has walked it already."""
    return {name: Site(name, EMBEDDING, None, m.embedding_dim, None, None, None)
            for name, m in (walk(model) if modules is None else modules) if isinstance(m, (nn.Embedding, LoraEmbedding))}


class LoraEmbedding(AdapterLayer):
    """A frozen nn.Embedding plus any number of named adapters (one (A, B) pair each)."""

    def __init__(self, base_layer: nn.Embedding, state, tied_head: bool = False):
        super().__init__(base_layer, state)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape  # (V, d)
        self.in_features, self.out_features = self.num_embeddings, self.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()  # adapter -> A (r, V)
        self.lora_embedding_B = nn.ParameterDict()  # adapter -> B (d, r)
        self.scaling: dict[str, float] = {}  # adapter -> alpha / r (or alpha / sqrt(r))
        self.ranks: dict[str, tuple[int, float]] = {}  # adapter -> (r, alpha)
        self._saved_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # merged adapter -> (rows, E[rows] before)
        self.tied_head = tied_head  # the model's LM head reads this same weight

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")  # PEFT's: the tables of trained weights
    other_param_names = ("r", "lora_alpha", "scaling")  # PEFT's: the other per-adapter tables
    r = property(lambda self: {name: r for name, (r, _) in self.ranks.items()})  # PEFT's layer.r[name]
    lora_alpha = property(lambda self: {name: alpha for name, (_, alpha) in self.ranks.items()})
    fan_in_fan_out = False  # E is stored (V, d), the lookup's own layout

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ranks)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, parts: dict, lora_dropout: float = 0.0, init_lora_weights=True,
                    use_rslora: bool = False, **variant_options) -> None:
        """Create adapter `name`: A (r, V) = 0 and B (d, r) ~ N(0, 1)."""
        self.refuse_variants(variant_options, "embeddings")
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if list(parts) != [FULL]:
            raise ValueError("an embedding has no slices: target it by its module name (e.g. 'wte', 'embed_tokens')")
        part = parts[FULL]
        r, V, d = part.r, self.num_embeddings, self.embedding_dim
        if not 0 < r <= min(V, d):
            raise ValueError(f"rank r={r} for an embedding of {V} rows × {d} dims: r must be between 1 and "
                             f"{min(V, d)}; lower r (rank_pattern can set it for this module alone)")
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, V, device=weight.device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(d, r, device=weight.device, dtype=dtype))
        self.scaling[name] = part.scale(use_rslora)
        self.ranks[name] = (r, part.alpha)
        self.reset_adapter(name, init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights=True) -> None:
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not available on embeddings; "
                             "use True, False or 'gaussian'")
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        nn.init.normal_(B)
        if init_lora_weights is False:  # a non-zero A: for tests that need the adapter to act
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{FULL: (A (r, V), B (d, r))} of adapter `name`."""
        return {FULL: (self.lora_embedding_A[name], self.lora_embedding_B[name])}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name], self.ranks[name]

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.add_deltas(self.base_layer(ids, *args, **kwargs), ids, "an embedding")  # (..., d)

    def delta(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """s · Aᵀ[ids] Bᵀ: (..., r) @ (r, d) -> (..., d)."""
        base = self.base_layer
        after_A = F.embedding(ids, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)  # (..., r)
        return (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]

    # ------------------------------------------------------------------ merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · (B A)ᵀ: ((d, r) @ (r, V))ᵀ -> (V, d), in fp32."""
        return self.scaling[name] * (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).T

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ValueError, changing nothing, if merging one of these adapters would give NaN or inf."""
        W = self.base_layer.weight  # (V, d)
        for name in (n for n in adapter_names if n in self.lora_embedding_A and n not in self.merged_adapters):
            if not torch.isfinite(W.float() + self.delta_weight(name)).all():
                raise ValueError(f"NaNs or infs detected in the merged weights: adapter {name!r} seems to be "
                                 "broken; nothing was merged")

    @torch.no_grad()
    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """E ← E + s·(B A)ᵀ for each adapter not merged yet; with a tied head the head changes too."""
        chosen = self.state.active if adapter_names is None else adapter_names
        names = [n for n in chosen if n in self.lora_embedding_A and n not in self.merged_adapters]
        W = self.base_layer.weight  # (V, d)
        if safe_merge:
            self.check_merge(names)
        if names and self.tied_head:
            warnings.warn("merging an embedding adapter into a weight the LM head shares (tied embeddings): the head "
                          "now reads the merged weight too, so the logits differ from the unmerged model's; "
                          "untie the head first (tie_word_embeddings=False) to adapt the lookup alone", stacklevel=3)
        for name in names:
            rows = self.lora_embedding_A[name].detach().ne(0).any(0).nonzero().squeeze(1)  # tokens it changes
            self._saved_rows[name] = (rows, W[rows].clone())  # for an exact unmerge
            W.copy_((W.float() + self.delta_weight(name)).to(W.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapter_names: Optional[list[str]] = None) -> None:
        """E ← E − s·(B A)ᵀ for merged adapters, latest first. Unmerging the last merged adapter puts
        back the rows saved at merge time, so E returns bit for bit; an earlier one is subtracted."""
        W = self.base_layer.weight
        for name in reversed(list(self.merged_adapters)):
            if adapter_names is None or name in adapter_names:
                rows, before = self._saved_rows.pop(name)
                W.copy_((W.float() - self.delta_weight(name)).to(W.dtype))
                if name == self.merged_adapters[-1]:  # nothing merged on top of it: the saved rows are exact
                    W[rows] = before
                self.merged_adapters.remove(name)

    # ------------------------------------------------------------------ files (PEFT's keys)
    def file_tensors(self, name: str, use_rslora: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
        return ({"lora_embedding_A": self.lora_embedding_A[name].detach(),
                 "lora_embedding_B": self.lora_embedding_B[name].detach()}, {"": self.ranks[name]})

    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        self.set_factors(name, FULL, tensors["lora_embedding_A"], tensors["lora_embedding_B"])

    def accepts_saved_table(self, table: torch.Tensor, where: str) -> bool:
        """PEFT saves the whole table beside an adapted embed_tokens (the vocabulary may have grown)."""
        if table.shape != self.base_layer.weight.shape:
            raise ValueError(f"{where}: the saved embedding table has shape {tuple(table.shape)} but this model's is "
                             f"{tuple(self.base_layer.weight.shape)}; resize the model's token embeddings "
                             "(resize_token_embeddings) to the adapter's vocabulary first")
        return True

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, adapters(rank)={self.ranks}"


def __getattr__(name: str):  # earlier names, kept for one release (renamed.py)
    return renamed.earlier_name(__name__, name, {'LoRAEmbedding': 'LoraEmbedding'}, globals())
