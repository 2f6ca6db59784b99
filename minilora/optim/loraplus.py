r"""LoRA+ (Hayou, Ghosh and Yu, 2024): B learns faster than A.

In W' = W + s·B·A with A ∈ R^{r×d_in} and B ∈ R^{d_out×r}, the two factors play different roles:
A maps the (wide) input into r features and B writes them out. For wide layers, the paper shows that
one learning rate for both is inefficient: feature learning needs η_B ≫ η_A. LoRA+ sets

    η_A = lr,      η_B = lr · loraplus_lr_ratio       (ratio ≥ 1; the paper suggests ≈ 16)

and changes nothing else. The trainable parameters fall into four optimizer groups (PEFT's):

    A                 every other trainable parameter (lora_A, full modules_to_save weights)   lr          decay
    embedding         parameters of LoRA layers over an embedding                              lr_emb      decay
    B                 lora_B weights, and 1-D parameters outside LayerNorm and not biases      lr · ratio  decay
    B, no decay       biases and LayerNorm parameters                                          lr · ratio  0

where `decay` is `loraplus_weight_decay` (0 unless given). Any other keyword (betas, eps, the
optimizer's own weight_decay default) goes to the optimizer unchanged; every group sets its own
learning rate and weight decay, so those two take effect through the groups only.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.optim import Optimizer


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that never decay: biases, and parameters of LayerNorm modules."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def _over_embedding(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` belongs to a LoRA layer whose base is an embedding."""
    owner = model
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
        if isinstance(getattr(owner, "base_layer", None), nn.Embedding):
            return True
    return False


def loraplus_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable parameters of `model`, by LoRA+ group: "A", "embedding", "B", "B_no_decay"."""
    no_decay = _no_decay_names(model)
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _over_embedding(model, name):
            key = "embedding"
        elif "lora_B" in name or param.ndim == 1:
            key = "B_no_decay" if name in no_decay else "B"
        else:
            key = "A"
        groups[key].append((name, param))
    return groups


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                              loraplus_weight_decay: float = 0.0, **kwargs: Any) -> Optimizer:
    """An `optimizer_cls` over the trainable parameters of `model` with LoRA+'s four groups (see the
    module docstring). `kwargs` go to `optimizer_cls` as they are (betas, eps, paging settings...)."""
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0 (η_B / η_A; typically 2 to 16), got {loraplus_lr_ratio}")
    groups = loraplus_groups(model)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters: add an adapter before building the optimizer")
    settings = {
        "A": (lr, loraplus_weight_decay),
        "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
        "B": (lr * loraplus_lr_ratio, loraplus_weight_decay),
        "B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    param_groups = [
        {"params": [p for _, p in groups[key]], "lr": group_lr, "weight_decay": decay}
        for key, (group_lr, decay) in settings.items()
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)
