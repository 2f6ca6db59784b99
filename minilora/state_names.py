"""Parameter and state-dict names: PEFT's layout, and minilora's earlier one read as it.

A LoraModel names its parameters as `peft.get_peft_model` does with the same config:

    base_model.model.<module path>.lora_A.<adapter>.weight          a whole-layer adapter (PEFT's name)
    base_model.model.<module path>.lora_A.<adapter>.<part>.weight   a slice of a fused layer (q of c_attn),
                                                                    which PEFT cannot express
    base_model.model.<module path>.base_layer.weight                the frozen base weight

Earlier minilora releases named the same tensors `model.<module path>.lora_A.<adapter>.full.weight`.
`current_name` reads those names as today's, so state dicts and trainer checkpoints written then
still load (with a FutureWarning saying how to drop the old names). Adapter files never changed:
they always held PEFT's keys.
"""

from __future__ import annotations

import re
import warnings

WRAPPER = "base_model.model."  # the prefix of every parameter of the wrapped HF model
_EARLIER_WHOLE_LAYER = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.full\.weight$")


def current_name(name: str) -> str:
    """`name` in today's layout: `model.<path>` becomes `base_model.model.<path>`, and a whole-layer
    pair's `lora_A.<adapter>.full.weight` becomes `lora_A.<adapter>.weight`. Today's names come back
    unchanged."""
    if not name.startswith(WRAPPER) and name.startswith("model."):
        name = "base_model." + name
    return _EARLIER_WHOLE_LAYER.sub(r".\1.\2.weight", name)


def accept_earlier_names(module, state_dict: dict, prefix: str, *args) -> None:
    """A load_state_dict pre-hook: keys of the earlier layout are renamed to today's, with a warning."""
    renamed = {key: prefix + current_name(key[len(prefix):]) for key in state_dict if key.startswith(prefix)}
    renamed = {old: new for old, new in renamed.items() if old != new}
    if not renamed:
        return
    example = next(iter(renamed.items()))
    warnings.warn(f"this state dict uses minilora's earlier parameter names ({len(renamed)} keys, e.g. "
                  f"{example[0]!r}, today {example[1]!r}): they were read as today's, which are PEFT's; save "
                  "the state dict again to drop this warning", FutureWarning, stacklevel=3)
    for old, new in renamed.items():
        state_dict[new] = state_dict.pop(old)
