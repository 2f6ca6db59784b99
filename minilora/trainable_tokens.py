r"""Trainable tokens (PEFT's `trainable_token_indices`): chosen rows of an embedding table trained in
full, the rest frozen: new special tokens without a LoRA on the whole table.

For token indices t_1 … t_k and an adapter's rows Δ (k × d), starting as E[t_j] (so a fresh adapter
changes nothing):

    embedding      y[i] = Δ_j if ids[i] = t_j, else E[ids[i]]           (a lookup, then k rows swapped in)
    tied LM head   logits[..., t_j] = h · Δ_j + b_{t_j}                   (the k logits of those rows recomputed)

Nothing of size (V × d) is formed in a forward pass: the embedding swaps rows of its output, and a
head that shares the table (GPT-2's, tied) recomputes k logits. Merging writes Δ into the table's
rows (and unmerging puts the originals back), which a tied head then reads too.

PEFT's layout: the wrapper at the embedding's path holds `token_adapter`, whose `base_layer` is the
embedding and whose `trainable_tokens_delta[<adapter>]` is Δ; a tied head gets a wrapper that shares
the same Δ. The file key is `<path>.token_adapter.trainable_tokens_delta`.

Shape legend: V = vocabulary, d = embedding dim, k = trainable tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import mixing
from .adapter_layer import AdapterLayer, AdapterState
from .roles import set_submodule

KEY = "token_adapter.trainable_tokens_delta"  # its key after `<module path>.` in PEFT's files


class TokenAdapter(nn.Module):
    """PEFT's `token_adapter`: the frozen table's module and the trained rows, per adapter."""

    def __init__(self, base_layer: nn.Module, shared: Optional["TokenAdapter"] = None):
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = shared.trainable_tokens_delta if shared else nn.ParameterDict()  # adapter -> Δ (k, d)
        self.token_indices: dict[str, list[int]] = shared.token_indices if shared else {}  # adapter -> t_1 … t_k


class TrainableTokens(AdapterLayer):
    """An nn.Embedding, or the Linear head tied to one (`tied`: the embedding's layer, whose rows it shares)."""

    adapter_layer_names = ("trainable_tokens_delta",)  # PEFT's names
    other_param_names = ("token_indices",)

    def __init__(self, base_layer: nn.Module, state: Optional[AdapterState] = None,
                 tied: Optional["TrainableTokens"] = None):
        nn.Module.__init__(self)  # not AdapterLayer's: the base lives in token_adapter, as in PEFT
        self.token_adapter = TokenAdapter(base_layer, tied.token_adapter if tied else None)
        self.merged_adapters: list[str] = []
        self.state = state if state is not None else AdapterState()
        self.__dict__["tied"] = tied  # not a submodule: the embedding's layer is registered where it lives
        self._originals: dict[str, torch.Tensor] = {}  # merged adapter -> the rows it replaced

    @staticmethod
    def can_wrap(module: nn.Module) -> bool:
        """A plain nn.Embedding, or one whose tokens another adapter already trains."""
        return isinstance(module, (nn.Embedding, TrainableTokens))

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # PEFT's tables, which its layer (our token_adapter) holds
    trainable_tokens_delta = property(lambda self: self.token_adapter.trainable_tokens_delta)
    token_indices = property(lambda self: self.token_adapter.token_indices)

    @property
    def in_features(self) -> int:
        base = self.base_layer
        return base.num_embeddings if isinstance(base, nn.Embedding) else base.in_features

    @property
    def out_features(self) -> int:
        base = self.base_layer
        return base.embedding_dim if isinstance(base, nn.Embedding) else base.out_features

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_adapter.token_indices)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, token_indices: list[int]) -> None:
        """Rows `token_indices` of the table become adapter `name`'s Δ, starting as they are."""
        if self.tied is not None:  # the embedding's layer added them; this head shares them
            return
        V = self.weight.shape[0]
        if not token_indices or not all(isinstance(t, int) and 0 <= t < V for t in token_indices) \
                or len(set(token_indices)) != len(token_indices):
            raise ValueError(f"trainable_token_indices must be distinct token ids in [0, {V}), got {token_indices!r}")
        W = self.weight.detach()
        dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
        self.token_adapter.token_indices[name] = list(token_indices)
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(W[token_indices].to(dtype).clone())  # (k, d)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [] if self.tied is not None else [self.token_adapter.trainable_tokens_delta[name]]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        if self.tied is None:
            del self.token_adapter.trainable_tokens_delta[name], self.token_adapter.token_indices[name]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        state = self.state
        if state.disabled:
            return y
        if state.routing is not None and state.routing.rows is not None:  # adapter_names=: one adapter per row
            return self._per_row(y, x, state.routing.rows)
        if state.routing is not None:
            raise ValueError("trainable tokens take no weights (adapter_weights=) and no router mixtures: their rows "
                             "replace the table's, they do not add to it; use set_adapter or adapter_names=")
        for name in state.active:  # the last active adapter's rows win
            if self.has_adapter(name) and name not in self.merged_adapters:
                y = self._swap_in(y, x, name)
        return y

    def _swap_in(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._head(y, x, name) if self.tied is not None else self._lookup(y, x, name)

    def _per_row(self, y: torch.Tensor, x: torch.Tensor, rows: tuple[str, ...]) -> torch.Tensor:
        """y (B, ...) with batch row i given adapter rows[i]'s tokens (mixing.BASE: the table's own)."""
        if len(rows) != len(y):
            raise ValueError(f"adapter_names has {len(rows)} entries for a batch of {len(y)} rows; give one per row")
        out = y.clone()
        for name in dict.fromkeys(rows):
            if name == mixing.BASE or not self.has_adapter(name) or name in self.merged_adapters:
                continue
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=y.device)
            out[index] = self._swap_in(out[index], x[index], name)
        return out

    def _lookup(self, y: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        """y (..., d) with the rows of trainable tokens swapped for Δ."""
        indices, delta = self.token_adapter.token_indices[name], self.token_adapter.trainable_tokens_delta[name]
        slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=ids.device)  # (V,): token -> row of Δ
        slot[indices] = torch.arange(len(indices), device=ids.device)
        row = slot[ids]  # (...,)
        return torch.where((row >= 0).unsqueeze(-1), delta[row.clamp(min=0)].to(y.dtype), y)

    def _head(self, y: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:
        """logits y (..., V) with the columns of trainable tokens recomputed from Δ: h (..., d) @ Δᵀ (d, k)."""
        indices = torch.tensor(self.token_adapter.token_indices[name], device=y.device)
        delta = self.token_adapter.trainable_tokens_delta[name]
        columns = h.to(delta.dtype) @ delta.t()  # (..., k)
        bias = self.base_layer.bias
        if bias is not None:
            columns = columns + bias[indices]
        return y.index_copy_(-1, indices, columns.to(y.dtype))  # in place: no second (..., V) logits tensor

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def _fold(self, name: str, sign: float) -> None:
        if self.tied is not None:  # the table is the embedding's: its layer folds the rows
            return
        W, indices = self.weight, self.token_adapter.token_indices[name]
        if sign > 0:
            self._originals[name] = W[indices].clone()
            W[indices] = self.token_adapter.trainable_tokens_delta[name].to(W.dtype)
        else:
            W[indices] = self._originals.pop(name)

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str]) -> None:
        for name in (n for n in adapter_names if self.has_adapter(n) and self.tied is None):
            if not torch.isfinite(self.token_adapter.trainable_tokens_delta[name]).all():
                raise ValueError(f"NaNs or infs detected in the trainable tokens of adapter {name!r}; nothing was merged")

    # ------------------------------------------------------------------ files (PEFT's keys)
    def file_tensors(self, name: str, use_rslora: bool) -> tuple[dict[str, torch.Tensor], dict]:
        if self.tied is not None:
            return {}, {}
        return {KEY: self.token_adapter.trainable_tokens_delta[name].detach()}, {}

    @torch.no_grad()
    def load_file_tensors(self, name: str, tensors: dict[str, torch.Tensor], use_rslora: bool, where: str) -> None:
        if self.tied is None:
            self.token_adapter.trainable_tokens_delta[name].copy_(tensors[KEY])

    def extra_repr(self) -> str:
        return f"trainable tokens per adapter={self.token_adapter.token_indices}{', tied' if self.tied else ''}"


def add_trainable_tokens(model: nn.Module, tokens: dict[str, list[int]], tied_heads: dict[str, str],
                         adapter_name: str, state: AdapterState) -> list[TrainableTokens]:
    """Give `adapter_name` the rows `tokens` names ({embedding path: token ids}, resolved by
    surgery.plan_adapter) and let a head tied to such a table ({embedding path: head path}) read
    them too. The wrappers."""
    layers = []
    for path, indices in tokens.items():
        module = model.get_submodule(path)
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module, state)
            set_submodule(model, path, module)
        module.add_adapter(adapter_name, list(indices))
        layers.append(module)
        if path in tied_heads:
            head = model.get_submodule(tied_heads[path])
            if not isinstance(head, TrainableTokens):
                head = TrainableTokens(head, state, tied=module)
                set_submodule(model, tied_heads[path], head)
            layers.append(head)
    return layers
