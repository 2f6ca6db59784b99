"""minilora inside other libraries' training loops: transformers' Trainer, TRL's SFTTrainer, and
`prepare_model_for_kbit_training` for QLoRA. Each workflow also runs with a PEFT model where that is
cheap, so a failure says which side broke: minilora, or the library around it."""

import copy
import inspect
import io
import json

import peft
import pytest
import torch
import trl
from conftest import VOCAB, batch, logits, make
from transformers import BertConfig, BertForQuestionAnswering, PreTrainedTokenizerFast, TrainingArguments
from transformers import Trainer as HFTrainer

import minilora
from minilora import LoraConfig, LoraModel, get_peft_model, prepare_model_for_kbit_training, quantize_model
from minilora.integrations import LoraTrainer as Trainer, restore_adapters
from minilora.integrations.trl import SFTTrainer
from minilora.quant import Linear4bit


def lora(family, seed=0, **config):
    model = make(family)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], **config))


PEFT_QV = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}  # PEFT's nearest to minilora's ["q", "v"]


def peft_lora(family):
    return peft.get_peft_model(make(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_QV[family]))


def rows(n=16, length=12, seed=0):
    """A causal-LM dataset: each row has input_ids, attention_mask and labels."""
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def arguments(out, **overrides):
    """Trainer defaults but for what a test needs: a few steps, evaluation, CPU, no reporting."""
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                    eval_steps=2, save_steps=2, learning_rate=1e-2, use_cpu=True, report_to="none",
                    disable_tqdm=True)
    return TrainingArguments(**{**settings, **overrides})


def eval_losses(trainer):
    return [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- the forward signature
def test_forward_shows_the_models_inputs_and_survives_a_copy():
    model = lora("gpt2")
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names", "adapter_weights"} <= set(params)
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "labels" in inspect.signature(LoraModel.forward).parameters  # the Trainer reads label names off the class
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin  # bound to the copy, not to the original
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "lora_B" in n).add_(1.0)  # B = 0 until trained
    inputs = batch("gpt2")
    assert not torch.allclose(logits(twin, inputs), logits(model, inputs))
    loss = model(**inputs, labels=inputs["input_ids"]).loss  # labels still reach the HF model
    assert loss is not None and loss.item() > 0
    saved = io.BytesIO()
    torch.save(twin, saved)
    saved.seek(0)
    unpickled = torch.load(saved, weights_only=False)
    assert "input_ids" in inspect.signature(unpickled.forward).parameters and unpickled.forward.__self__ is unpickled
    torch.testing.assert_close(logits(unpickled, inputs), logits(twin, inputs))


# ---------------------------------------------------------------------------------- transformers' Trainer
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_plain_trainer_trains_and_reports_eval_loss(family, tmp_path):
    """The zero-change path: `transformers.Trainer(model=lora_model)`, remove_unused_columns left True."""
    model = lora(family)
    before = adapter_weights(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = HFTrainer(model=model, args=arguments(tmp_path / "ours", save_strategy="no"),
                        train_dataset=rows(), eval_dataset=rows(8, seed=1))
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert len(eval_losses(trainer)) == 2
    after = adapter_weights(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapter trained
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)

    peer = HFTrainer(model=peft_lora(family), args=arguments(tmp_path / "peft", save_strategy="no"),
                     train_dataset=rows(), eval_dataset=rows(8, seed=1))
    peer.train()
    assert len(eval_losses(peer)) == 2


def test_plain_trainer_saves_the_whole_model_and_resumes_from_it(tmp_path):
    """The zero-change path saves what the Trainer saves for a model it does not know: one
    `model.safetensors` of the whole state dict (LLaMA's head is its own matrix)."""
    family = "llama"
    model = lora(family)
    trainer = HFTrainer(model=model, args=arguments(tmp_path / "run", eval_strategy="no"), train_dataset=rows())
    trainer.train()
    last = tmp_path / "run" / "checkpoint-4"
    files = {p.name for p in last.iterdir()}
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    inputs = batch(family)
    trained = logits(model.eval(), inputs)

    resumed = lora(family, seed=7)  # other initial weights: only the checkpoint can bring it back on track
    again = HFTrainer(model=resumed, args=arguments(tmp_path / "resumed", eval_strategy="no"), train_dataset=rows())
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert again.state.global_step == 4
    torch.testing.assert_close(logits(resumed.eval(), inputs), trained, atol=1e-5, rtol=1e-5)


def test_state_dict_lists_a_tied_weight_under_every_name_and_loads_either_way():
    """As PEFT's and torch's: GPT-2's head is listed beside the embeddings it shares. A state dict
    that lists it once (safetensors' save_model, earlier minilora releases) loads too, and the tie stays."""
    model = lora("gpt2")
    state = model.state_dict()
    embeddings, head = "base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"
    assert state[head].data_ptr() == state[embeddings].data_ptr()
    once = {k: v.clone() for k, v in state.items() if k != head}
    for given in (state, once):
        assert not model.load_state_dict(given, strict=True).missing_keys
        assert model.model.lm_head.weight is model.model.transformer.wte.weight
    assert set(state) == {"base_model.model." + k for k in model.model.state_dict()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpoints_are_adapters_that_load_and_resume(family, tmp_path):
    model = lora(family)
    trainer = Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=rows(), eval_dataset=rows(8, seed=1))
    trainer.train()
    assert len(eval_losses(trainer)) == 2
    last = tmp_path / "run" / "checkpoint-4"
    files = {p.name for p in last.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # the adapter, not the whole model
    assert json.loads((last / "adapter_config.json").read_text())["peft_type"] == "LORA"

    inputs = batch(family)
    trained = logits(model.eval(), inputs)
    assert not torch.allclose(trained, logits(make(family), inputs))
    torch.testing.assert_close(logits(LoraModel.from_pretrained(make(family), last), inputs), trained)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(make(family), str(last)), inputs), trained,
                               atol=1e-5, rtol=1e-5)

    resumed = lora(family, seed=7)  # other initial weights: only the checkpoint can bring it back on track
    again = Trainer(model=resumed, args=arguments(tmp_path / "resumed"), train_dataset=rows(), eval_dataset=rows(8, seed=1))
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert again.state.global_step == 4
    torch.testing.assert_close(logits(resumed.eval(), inputs), trained, atol=1e-5, rtol=1e-5)


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = lora("gpt2")
    # "best" is the highest eval loss here, so that the best checkpoint is not the last one
    args = arguments(tmp_path, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows(), eval_dataset=rows(8, seed=1))
    trainer.train()
    first, last = eval_losses(trainer)
    assert first > last and trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    inputs = batch("gpt2")
    best = logits(LoraModel.from_pretrained(make("gpt2"), tmp_path / "checkpoint-2"), inputs)
    final = logits(LoraModel.from_pretrained(make("gpt2"), tmp_path / "checkpoint-4"), inputs)
    assert not torch.allclose(best, final)
    torch.testing.assert_close(logits(model.eval(), inputs), best)
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]


def test_a_checkpoint_of_another_configuration_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    other = get_peft_model(make("gpt2"), LoraConfig(r=8, target_modules=["q", "v"], init_lora_weights=False))
    other.save_pretrained(tmp_path)
    model = lora("gpt2")
    before = adapter_weights(model)
    with pytest.raises(ValueError, match="another configuration"):
        restore_adapters(model, tmp_path)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert all(torch.equal(p, before[n]) for n, p in adapter_weights(model).items())
    assert restore_adapters(model, tmp_path / "missing") == []  # no adapter there: nothing restored


def test_label_names_come_from_the_hf_model(tmp_path):
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB)
    model = get_peft_model(BertForQuestionAnswering(cfg), LoraConfig(r=4, target_modules=["q", "v"]))
    args = arguments(tmp_path, eval_strategy="no")
    assert Trainer(model=model, args=args).label_names == ["start_positions", "end_positions"]
    assert HFTrainer(model=model, args=args).label_names == ["labels"]  # the plain Trainer sees only the class


# ---------------------------------------------------------------------------------- TRL
def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: "<pad>", "<eos>", "<unk>", w0 … w124."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def texts(n=16, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"text": [" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (10,), generator=g))
                                       for _ in range(n)]})


def sft_config(out, **overrides):
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                    eval_strategy="steps", eval_steps=2, learning_rate=1e-2, use_cpu=True, bf16=False,
                    report_to="none", disable_tqdm=True)
    return trl.SFTConfig(**{**settings, **overrides})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sft_trainer_trains_a_lora_model_and_checkpoints_its_adapter(family, tmp_path):
    model = lora(family)
    before = adapter_weights(model)
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path / "ours"), train_dataset=texts(),
                         eval_dataset=texts(4, seed=1), processing_class=tokenizer())
    trainer.train()
    assert len(eval_losses(trainer)) == 2
    assert any(not torch.equal(before[n], p) for n, p in adapter_weights(model).items())
    assert model.base_model.model is model.get_base_model()  # PEFT's path to the HF model still holds
    last = tmp_path / "ours" / "checkpoint-4"
    files = {p.name for p in last.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    inputs = batch(family)
    torch.testing.assert_close(logits(LoraModel.from_pretrained(make(family), last), inputs), logits(model.eval(), inputs))

    peer = trl.SFTTrainer(model=peft_lora(family), args=sft_config(tmp_path / "peft", eval_strategy="no"), train_dataset=texts(),
                          processing_class=tokenizer())
    peer.train()
    assert (tmp_path / "peft" / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_plain_sft_trainer_mistakes_the_wrapper_for_the_backbone(tmp_path):
    """Why minilora.integrations.trl.SFTTrainer exists: TRL's fused loss calls `model.base_model`
    as the backbone, which on a LoraModel (as on PEFT's PeftModel) is the adapter wrapper."""
    trainer = trl.SFTTrainer(model=lora("gpt2"), args=sft_config(tmp_path, eval_strategy="no"), train_dataset=texts(),
                             processing_class=tokenizer())
    with pytest.raises(AttributeError, match="last_hidden_state"):
        trainer.train()


def test_sft_trainer_refuses_an_adapter_on_the_lm_head(tmp_path):
    model = get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LM head"):
        SFTTrainer(model=model, args=sft_config(tmp_path, eval_strategy="no"), train_dataset=texts(),
                   processing_class=tokenizer())


# ---------------------------------------------------------------------------------- QLoRA preparation
def checkpointing(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def quantized_llama(dtype=torch.float32):
    model = make("llama").to(dtype)
    quantize_model(model, minilora.NF4Config(blocksize=64), skip_modules=["lm_head"])
    return model


def test_prepare_freezes_casts_small_parameters_and_turns_checkpointing_on():
    model = quantized_llama(torch.bfloat16)
    buffers = {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("weight", "absmax", "absmax2")}
    assert prepare_model_for_kbit_training(model) is model
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # norms, embeddings, head
    for name, b in model.named_buffers():
        if name in buffers:  # the 4-bit codes and their scales, untouched
            assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    assert all(m.weight_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, Linear4bit))
    assert checkpointing(model)
    assert model.model.embed_tokens(torch.tensor([[3]])).requires_grad  # reentrant checkpointing needs it

    # PEFT's own function takes the minilora-quantized model for a full-precision one (it looks for
    # bitsandbytes' is_loaded_in_4bit flag) and leaves checkpointing off, without a word
    theirs = peft.prepare_model_for_kbit_training(quantized_llama(torch.bfloat16))
    assert not checkpointing(theirs)
    assert not checkpointing(prepare_model_for_kbit_training(make("llama")))  # not quantized: as PEFT, no checkpointing


def saved_activation_bytes(model, ids):
    """Bytes autograd keeps for the backward pass of one forward. With reentrant checkpointing (the
    default), a checkpointed layer runs its forward without grad and saves nothing but its input,
    which the checkpoint saves itself, so every tensor held for the backward passes through the
    pack hook of saved_tensors_hooks: their total is the activation memory, on any device, free of
    allocator and RSS noise. Counted once per storage; parameters and buffers, which exist anyway,
    are left out."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, sum(seen.values())


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
def test_checkpointing_keeps_the_adapter_gradients_and_saves_memory(kwargs):
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for on in (False, True):
        torch.manual_seed(0)
        base = prepare_model_for_kbit_training(quantized_llama(), use_gradient_checkpointing=on,
                                               gradient_checkpointing_kwargs=kwargs)
        assert checkpointing(base) is on
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
        loss, held = saved_activation_bytes(model, ids)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        runs[on] = loss.detach(), grads, held
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
    for name, g in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], g, rtol=1e-6, atol=1e-7, msg=name)
    if kwargs is None:  # the count is exact for reentrant checkpointing (see saved_activation_bytes)
        assert runs[True][2] < 0.5 * runs[False][2], (runs[True][2], runs[False][2])
