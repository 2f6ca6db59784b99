"""The model card (README.md) PEFT writes beside an adapter, with its metadata: a new one, or an
existing card kept with PEFT's metadata added to its front matter.
"""

from __future__ import annotations

import re
from typing import Union


def updated(card: str, base_model: Union[str, None]) -> str:
    """A model card already in the directory, its text kept, with PEFT's metadata (base_model,
    library_name, tags) added to its front matter where it lacks them, as PEFT updates a card."""
    match = re.match(r"---\n(.*?)^---\n", card, re.DOTALL | re.MULTILINE)
    front, body = (match.group(1), card[match.end():]) if match else ("", card)
    keys = {line.split(":", 1)[0] for line in front.splitlines() if ":" in line and not line.startswith((" ", "-"))}
    wanted = {"base_model": f"base_model: {base_model}\n" if base_model else "", "library_name": "library_name: peft\n",
              "tags": "tags:\n- lora\n- minilora\n"}
    added = "".join(text for key, text in wanted.items() if key not in keys)
    return f"---\n{front}{added}---\n{body}"


CARD = """---
{front}library_name: peft
tags:
- lora
- minilora
---

# LoRA adapter

A LoRA adapter saved by minilora in PEFT's format: `adapter_config.json` and the adapter's
weights, not the base model's. It adds (alpha / r) * B * A to each adapted layer of the base model.

## Adapter

- **Base model:** {base}
- **Task type:** {task_type}
- **Adapted modules:** {targets}
- **Rank r / lora_alpha:** {r} / {alpha}{patterns}
- **rsLoRA scaling (alpha / sqrt(r)):** {rslora}
- **LoRA dropout:** {dropout}
- **Trained in full (modules_to_save):** {saved}
- **Biases trained:** {bias}

## How to load

With PEFT:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")
```

With minilora:

```python
from minilora import LoraModel
model = LoraModel.from_pretrained(base_model, "path/to/this/adapter")
model = model.merge_and_unload()  # optional: fold the adapter into the base weights
```

## Training details

The training data, objective, hyperparameters and evaluation are not recorded in this card: add
them here, together with what the adapter was checked for (the tasks it improves, and the base
model's abilities it was checked not to lose).

## Intended use and limitations

The adapter inherits the base model's limitations and biases; describe here what it is meant for
and where it should not be used.
"""


def new(base_model: Union[str, None], peft_config: dict) -> str:
    """The README.md written beside a new adapter: PEFT's metadata, the adapter's settings, how to load it."""
    patterns = "".join(f"; {key}: `{peft_config[key]}`" for key in ("rank_pattern", "alpha_pattern") if peft_config.get(key))
    return CARD.format(
        front=f"base_model: {base_model}\n" if base_model else "", base=base_model or "not recorded",
        task_type=peft_config.get("task_type") or "none", targets=f"`{peft_config.get('target_modules')}`",
        r=peft_config.get("r"), alpha=peft_config.get("lora_alpha"), patterns=patterns,
        rslora="yes" if peft_config.get("use_rslora") else "no", dropout=peft_config.get("lora_dropout"),
        saved=f"`{peft_config['modules_to_save']}`" if peft_config.get("modules_to_save") else "none",
        bias=peft_config.get("bias", "none"))


# ---------------------------------------------------------------------------- files -> model
