r"""The policy a preference loss measures against (π_ref), and the trained policy beside it.

    reference="base"           π_ref = the model with every adapter switched off (disable_adapter).
                               Right only when the trained adapter starts from zero on the original base.
    reference="adapter:NAME"   π_ref = the model with adapter NAME alone: the fine-tuned (SFT) model,
                               frozen. The trained policy is the adapter named "policy":
        policy="copy"            a trainable copy of NAME (TRL's choice): π starts equal to π_ref
        policy="stack"           a new adapter acting on top of NAME (B = 0 at the start):
                                 W + ΔW_NAME + ΔW_policy, only ΔW_policy trains (fewer parameters)

One model, one base, on a 4-bit base too: π_ref is the same weights with other adapters acting
(LoraModel.adapters_acting), in eval mode and without gradients, so its log-probs are exactly the
SFT model's, with no merge and no second copy of the base.

reference_pass="mixed" computes π_ref's rows in the policy's forward instead (preference.mixed_logps):
the pairs twice, the first copy's rows with "policy", the second's with NAME (adapter_names=,
mixing.add_own_paths), the reference's log-probs detached. One forward of 2P pairs instead of two of P; the backward runs
through all 2P (zero gradient on the reference's), and their activations are kept. Exact only
without dropout (the pass is in train mode), so a model with any is refused.

Why "adapter off" is wrong after SFT: it is the model before SFT, so DPO would be held close to a
model the pipeline already moved away from. After a PiSSA, OLoRA, orthogonal or LoftQ start it is
no trained model at all: those starts rewrite the base into a residual W_res = W − ΔW₀, and the
original model is W_res + ΔW₀, the adapter as it started. Such a model with reference="base" is
refused; reference="adapter:NAME" on the adapter as it starts is the original model.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from torch import nn

from .. import named_init
from ..peft_functions import get_peft_model_state_dict, set_peft_model_state_dict

POLICY = "policy"  # the adapter a reference="adapter:NAME" run trains
POLICIES = ("copy", "stack")
PASSES = ("separate", "mixed")  # how π_ref's log-probs are computed beside the policy's


def adapter_of(reference: str) -> Optional[str]:
    """NAME of "adapter:NAME"; None for "base"; ValueError for anything else."""
    if reference == "base":
        return None
    kind, _, name = reference.partition(":")
    if kind != "adapter" or not name:
        raise ValueError(f"reference={reference!r}: use 'base' (the adapters switched off) or 'adapter:NAME' (the "
                         "frozen adapter NAME, e.g. the SFT adapter, as the reference policy)")
    return name


def check(reference: str, policy: str, reference_pass: str = "separate") -> None:
    name = adapter_of(reference)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose 'copy' (train a copy of the reference adapter) or 'stack' (train "
                         "a new adapter on top of it)")
    if reference_pass not in PASSES:
        raise ValueError(f"reference_pass={reference_pass!r}: choose {' or '.join(map(repr, PASSES))}")
    if reference_pass == "mixed" and (name is None or policy != "copy"):
        raise ValueError("reference_pass='mixed' runs the policy's rows and the reference's in one forward, one adapter "
                         "per row: it needs reference='adapter:NAME' and policy='copy' (a stack puts two adapters on "
                         "a row); use reference_pass='separate'")


def check_mixed(model: nn.Module) -> None:
    """The mixed pass runs in train mode: the reference rows would meet dropout, and π_ref would not be
    one fixed function. Refused for a model with any dropout."""
    dropped = next((n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0), None)
    if dropped is not None:
        raise ValueError(f"reference_pass='mixed' computes the reference rows in train mode, and {dropped} drops out "
                         "activations there; set the model's and the adapters' dropout to 0, or use "
                         "reference_pass='separate'")


def set_up(model: nn.Module, reference: str, policy: str) -> None:
    """Before the trainer collects what trains. "base": refuse a base an init rewrote. "adapter:NAME":
    create the adapter "policy" (unless the model has one already, as when a run resumes on the same
    model), make it the one that trains, and leave NAME frozen."""
    name = adapter_of(reference)
    configs = getattr(model, "peft_config", {})
    if name is None:
        rewritten = sorted(n for n, c in configs.items() if named_init.changes_base(c.init_lora_weights))
        if rewritten:
            init = configs[rewritten[0]].init_lora_weights
            raise ValueError(f"adapter {rewritten[0]!r} started from init_lora_weights={init!r}, which rewrote the base "
                             "into a residual: with the adapters off the model is neither the original nor a fine-tuned "
                             f"one. Use reference='adapter:{rewritten[0]}' before training it (the adapter as it starts "
                             "is the original model), or the adapter you fine-tuned")
        return
    if not callable(getattr(model, "adapters_acting", None)):
        raise ValueError(f"reference='adapter:{name}' needs a minilora LoraModel that holds adapter {name!r}")
    if name not in configs or name == POLICY:
        raise ValueError(f"reference='adapter:{name}': the model holds no adapter {name!r} to use (its adapters: "
                         f"{sorted(configs)}); load the fine-tuned adapter under that name first "
                         f"(load_adapter(directory, adapter_name={name!r}), or --adapter DIRECTORY)")
    if POLICY not in configs:
        config = copy.deepcopy(configs[name])
        config.init_lora_weights = True  # B = 0; a copy's weights come next; never a second rewrite of the base
        config.inference_mode = False
        if policy == "stack":  # the module copies and tokens NAME trains stay NAME's, frozen
            config.modules_to_save, config.trainable_token_indices = None, None
        model.add_adapter(POLICY, config)
        if policy == "copy":  # its tensors under PEFT's keys, into the new adapter: every kind of layer alike
            set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=name), adapter_name=POLICY)
    model.set_adapter([POLICY] if policy == "copy" else [name, POLICY])
    model.set_requires_grad(name, False)


@contextlib.contextmanager
def acting(model: nn.Module, reference: str) -> Iterator[None]:
    """Inside: the model computes π_ref (eval mode, no gradients)."""
    name = adapter_of(reference)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (model.disable_adapter() if name is None else model.adapters_acting([name])):
            yield
    finally:
        model.train(was_training)
