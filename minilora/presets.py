"""Named adapter plans: a LoraConfig for a purpose, in one call.

    article   the plan this project is built around (fine-tuning without catastrophic forgetting):
              Q and V only (GPT-2's fused c_attn sliced, K untouched), the lower half of the layers
              left without LoRA, rank rising with depth, embeddings frozen, the LM head trainable:

                  depth  [0, ½L)   [½L, ¾L)          [¾L, L)
                  LoRA   none      r=8,  α=16         r=16, α=32

    cfg = presets.article()                                   # the plan
    cfg = presets.article(head=False, task_type="SEQ_CLS")    # an encoder's classifier: no LM head
    cfg = presets.preset("article")                           # by name, as `--preset article` does

A plan is an ordinary LoraConfig: every field can still be set (`**overrides`).
"""

from __future__ import annotations

import warnings

from .config import Band, LoraConfig

# the article's bands: lower half untouched, a low-rank middle band, a higher-rank upper band
ARTICLE_BANDS = (Band(0.5, 0.75, r=8, lora_alpha=16), Band(0.75, 1.0, r=16, lora_alpha=32))


def article(target_modules=("q", "v"), bands=ARTICLE_BANDS, head: bool = True, **overrides) -> LoraConfig:
    """The article's plan (the module docstring); `head=False` leaves the LM head frozen."""
    top = bands[-1]
    return LoraConfig(r=top.r, lora_alpha=top.lora_alpha, target_modules=list(target_modules),
                      layer_bands=tuple(bands), modules_to_save=["lm_head"] if head else None, **overrides)


PRESETS = {"article": article}  # the choices of `--preset`


def preset(name: str, **overrides) -> LoraConfig:
    """The named plan's LoraConfig."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


def _earlier_article(cls, *args, **kwargs) -> LoraConfig:
    """LoraConfig.article(...), the earlier spelling of `article(...)`, kept for one release."""
    warnings.warn("LoraConfig.article() is now minilora.presets.article() (a preset, not a part of LoraConfig); the "
                  "old spelling goes in the next release", FutureWarning, stacklevel=2)
    return article(*args, **kwargs)


LoraConfig.article = classmethod(_earlier_article)  # minilora/__init__.py imports this module: always in place
