"""TRL's SFTTrainer for a minilora LoraModel: it trains, and its checkpoints are adapters.

    from minilora.integrations.trl import SFTTrainer    # instead of: from trl import SFTTrainer
    trainer = SFTTrainer(model=lora_model, args=SFTConfig(...), train_dataset=..., processing_class=tok)

`trl.SFTTrainer(model=lora_model)` itself fails at the first step. TRL computes the loss through a
fused LM head that it attaches to the transformers model: for a PEFT model (recognised by class)
to the model inside, for any other model to the object it was given. The fused forward then calls
`self.base_model(...)` and reads `.last_hidden_state`, taking `base_model` for the backbone, as on
a PreTrainedModel. On a LoraModel, as on PEFT's PeftModel, `base_model` is the adapter wrapper whose
`.model` is the HF model (PEFT's `peft_model.base_model.model` path), and calling it returns the
HF model's full output, logits and all. Making `base_model` the backbone would break that path, so
this subclass does for a LoraModel what TRL does for a PEFT model: after TRL's set-up it gives the
LoraModel back its own forward and attaches the fused head to the HF model inside, whose
`base_model` is the backbone. The LoRA layers sit in that backbone, so they train as usual.

Checkpoints hold the adapter in PEFT's format (LoraTrainerMixin, trainer.py). Not supported, as
with PEFT in TRL: a LoRA adapter on the LM head itself (the fused head reads `lm_head.weight`
directly, so the adapter would never train); TRL's `peft_config=` argument, which builds a PEFT
model (build the minilora model yourself and pass it as `model`).
"""

from __future__ import annotations

import trl

from ..adapter_layer import AdapterLayer
from ..signature import bind_forward
from .trainer import LoraTrainerMixin

FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # the per-token fields trl.SFTTrainer asks its head for


class SFTTrainer(LoraTrainerMixin, trl.SFTTrainer):
    """trl.SFTTrainer that trains a LoraModel and checkpoints its adapters (PEFT's format)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        lora = self.lora_model()
        if lora is None:
            return
        try:
            from trl.trainer.utils import add_fused_lm_head
        except ImportError:  # a TRL without the fused head computes the loss from the model's logits
            return
        hf_model = lora.get_base_model()
        if isinstance(hf_model.get_output_embeddings(), AdapterLayer):  # LoRA, or trainable tokens of a tied head
            raise ValueError("a LoRA adapter (or trainable tokens of a tied table) on the LM head is not supported by "
                             "TRL's SFTTrainer: its loss reads lm_head.weight directly, so the adapter would never "
                             "train. Remove the head from target_modules (or train it whole with "
                             "modules_to_save=['lm_head'])")
        bind_forward(lora, hf_model)  # the LoraModel's own forward again, in place of TRL's wrapper
        add_fused_lm_head(hf_model, outputs=FUSED_OUTPUTS)
