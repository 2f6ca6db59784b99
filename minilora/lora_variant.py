r"""The protocol every LoRA variant of a LoraLinear keeps: what one adapter's low-rank path is.

An adapter of a LoraLinear is plain LoRA (plain_lora.py) unless a variant says otherwise. A
variant is switched on per adapter by the LoraConfig field of the same name (PEFT's: `use_dora`,
`lora_bias`) and is one of two sorts:

    a path     computes the adapter's whole change in place of plain LoRA (DoRA)
    an addition  adds a term on top of whichever path runs (lora_bias)

Each owns, for the adapters it holds:

    add(layer, name, init_lora_weights)   its parameters, initialised so a fresh adapter is a no-op
    holds(layer, name)                    whether adapter `name` uses it
    forward(layer, name, y, x, weight)    y (..., d_out), the output so far, plus `weight` times its part
                                          of the change (the whole change, for a path)
    check_fold(layer, name)               raise, changing nothing, if folding would fail or give NaN/inf
    fold(layer, name, sign)               merge (+1) into the base layer, or take it back out (−1):
                                          exact, so merge + unmerge restores the base bit for bit
    file_tensors(layer, name, ratio)      {key suffix after `<module path>.`: tensor}, under PEFT's keys
                                          (`ratio`: each part's scale over the scale of the one LoRA a
                                          file holds; A and B themselves are the layer's, common to all)
    load_file_tensors(layer, name, tensors, ratio, where)    the inverse, every value checked

LoraLinear calls these at each point and knows no variant by name; registering one is a line in
variants.py. Mixed batches (adapter_names=) and learned routers stack plain (A, B) pairs, so an
adapter that uses any variant is refused there by name (`label`).
"""

from __future__ import annotations

import torch


class LoraVariant:
    field: str = ""  # the LoraConfig field (and add_adapter option) that switches it on
    label: str = ""  # how errors name it
    replaces_path: bool = False  # True: its forward computes the adapter's whole change (a path)

    def add(self, layer, name: str, init_lora_weights) -> None:
        raise NotImplementedError

    def holds(self, layer, name: str) -> bool:
        raise NotImplementedError

    def forward(self, layer, name: str, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        raise NotImplementedError

    def check_fold(self, layer, name: str) -> None:
        """Nothing to check unless a variant says so."""

    def fold(self, layer, name: str, sign: float) -> None:
        raise NotImplementedError

    def file_tensors(self, layer, name: str, ratio: dict[str, float]) -> dict[str, torch.Tensor]:
        return {}

    def load_file_tensors(self, layer, name: str, tensors: dict[str, torch.Tensor], ratio: dict[str, float],
                          where: str) -> None:
        """Nothing to read unless a variant saves something."""
