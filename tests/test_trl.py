"""TRL's trainers on minilora models (minilora.integrations.trl), with TRL on PEFT as the oracle:
the same adapter weights, data and seed give the same losses (1e-5) step by step, the reference
policy is the adapter switched off (no second model is loaded), and `peft_config=` takes a
minilora LoraConfig."""

import math
import warnings

import peft
import pytest
import torch
import trl
from conftest import VOCAB
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

import minilora
from minilora.integrations import trl as minilora_trl

TARGETS = ["q_proj", "v_proj"]


def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: "<pad>", "<eos>", "<unk>", w0 … w124."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def words(g, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (n,), generator=g))


def pairs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({key: [words(g, 4) for _ in range(n)] for key in ("prompt", "chosen", "rejected")})


def llama_config():
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def base(kind="causal"):
    torch.manual_seed(0)
    if kind == "causal":
        return LlamaForCausalLM(llama_config())
    config = llama_config()
    config.num_labels = 1
    return LlamaForSequenceClassification(config)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A LoRA adapter PEFT saved for each base (B not zero), that both libraries then train."""
    root = tmp_path_factory.mktemp("trl_adapters")
    for kind, task in (("causal", "CAUSAL_LM"), ("classifier", "SEQ_CLS")):
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type=task)
        peft.get_peft_model(base(kind), config).save_pretrained(root / kind)
    return root


def loaded(library, kind, adapters):
    cls = peft.PeftModel if library == "peft" else minilora.PeftModel
    return cls.from_pretrained(base(kind), adapters / kind, is_trainable=True)


def common(out):
    return dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                bf16=False, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0)


def losses(trainer):
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry], dtype=torch.float64)


def run(trainer_class, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer = trainer_class(**kwargs)
        trainer.train()
    return trainer


def reward_of_length(completions, **kwargs):
    """GRPO's reward: longer completions score higher (any deterministic function of the text would do)."""
    return [float(len(c.split())) for c in completions]


CASES = {
    "sft": (trl.SFTTrainer, minilora_trl.SFTTrainer, "causal",
            lambda out: trl.SFTConfig(**common(out)), lambda: Dataset.from_dict(
                {"text": [words(torch.Generator().manual_seed(i), 10) for i in range(8)]})),
    "dpo": (trl.DPOTrainer, minilora_trl.DPOTrainer, "causal",
            lambda out: trl.DPOConfig(**common(out), beta=0.1), pairs),
    "reward": (trl.RewardTrainer, minilora_trl.RewardTrainer, "classifier",
               lambda out: trl.RewardConfig(**common(out)), lambda: pairs().remove_columns("prompt")),
    "grpo": (trl.GRPOTrainer, minilora_trl.GRPOTrainer, "causal",
             lambda out: trl.GRPOConfig(**{**common(out), "per_device_train_batch_size": 4}, num_generations=2,
                                        max_completion_length=4, beta=0.05, temperature=1.0),
             lambda: pairs().remove_columns(["chosen", "rejected"])),
}


@pytest.mark.parametrize("name", CASES)
def test_a_trl_trainer_gives_peft_s_losses_on_the_same_adapter(name, adapters, tmp_path):
    theirs_class, ours_class, kind, make_args, data = CASES[name]
    extra = {"reward_funcs": reward_of_length} if name == "grpo" else {}
    theirs = run(theirs_class, model=loaded("peft", kind, adapters), args=make_args(tmp_path / "peft"),
                 train_dataset=data(), processing_class=tokenizer(), **extra)
    ours = run(ours_class, model=loaded("minilora", kind, adapters), args=make_args(tmp_path / "minilora"),
               train_dataset=data(), processing_class=tokenizer(), **extra)
    expected = losses(theirs)
    assert len(expected) == 3
    torch.testing.assert_close(losses(ours), expected, atol=1e-5, rtol=1e-5)
    if name in ("dpo", "grpo"):
        assert ours.ref_model is None and theirs.ref_model is None  # the reference is the adapter switched off
    trained = {k: v for k, v in minilora.get_peft_model_state_dict(ours.model).items()}
    reference = peft.get_peft_model_state_dict(theirs.model)
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", CASES)
def test_peft_config_takes_a_minilora_config(name, tmp_path):
    _, ours_class, kind, make_args, data = CASES[name]
    task_type, wrapper = ("SEQ_CLS", minilora.PeftModelForSequenceClassification) if kind == "classifier" \
        else ("CAUSAL_LM", minilora.PeftModelForCausalLM)
    extra = {"reward_funcs": reward_of_length} if name == "grpo" else {}
    config = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type=task_type)
    trainer = run(ours_class, model=base(kind), args=make_args(tmp_path), train_dataset=data(),
                  processing_class=tokenizer(), peft_config=config, **extra)
    assert isinstance(trainer.model, wrapper) and len(losses(trainer)) == 3
    assert getattr(trainer, "ref_model", None) is None
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(base(kind), tmp_path / "adapter")  # PEFT reads the checkpoint
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(reloaded.eval()(ids).logits, trainer.model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="peft_config. must be a .peft.PeftConfig"):
        trl.SFTTrainer(model=base(kind), args=trl.SFTConfig(**common(tmp_path / "x")), train_dataset=data(),
                       processing_class=tokenizer(), peft_config=["not", "a", "config"])


def test_a_reference_taken_from_a_rewritten_base_is_refused_and_the_wrapped_model_is_its_own(tmp_path):
    """PiSSA rewrites the base: TRL's adapter-off reference for an adapter it creates would be no
    trained model. Refused; wrapped first, TRL's reference is the starting adapter (the original model)."""
    config = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa",
                                 task_type="CAUSAL_LM")
    args = trl.DPOConfig(**{**common(tmp_path), "max_steps": 1}, beta=0.1)
    with pytest.raises(ValueError, match="rewrites the base.*get_peft_model"):
        minilora_trl.DPOTrainer(model=base(), args=args, train_dataset=pairs(), processing_class=tokenizer(),
                                peft_config=config)
    trainer = run(minilora_trl.DPOTrainer, model=minilora.get_peft_model(base(), config), args=args,
                  train_dataset=pairs(), processing_class=tokenizer())
    assert losses(trainer)[0].item() == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start
