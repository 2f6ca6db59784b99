"""The embedded experiments of `minilora finetune`, apart from the library they use.

    synthetic  the default: a small GPT-2 pretrained here on generated text, then each strategy
               fine-tuned on finance text and watched for what it forgets (synthetic.py, corpus.py;
               lora_article_dpo adds DPO after it: dpo.py)
    minilm     the pretrained sentence encoder all-MiniLM-L6-v2 on standard-library docstrings
               (minilm.py, docstrings.py)

settings.py holds what they share. The library (minilora.train) never imports this package.
"""

from __future__ import annotations

from typing import Callable

from .settings import ALL_STRATEGIES, EXPERIMENT_DEFAULTS, EXPERIMENTS, DemoSettings


def run(settings: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run the experiment `settings.experiment` names; its report (see its module)."""
    settings.check()
    if settings.experiment == "minilm":  # each experiment imports its own models and data
        from . import minilm as experiment
    else:
        from . import synthetic as experiment
    return experiment.run(settings, log)


__all__ = ["ALL_STRATEGIES", "EXPERIMENT_DEFAULTS", "EXPERIMENTS", "DemoSettings", "run"]
