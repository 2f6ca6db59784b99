"""The chunked linear cross-entropy (minilora/train/chunked_loss.py): the same loss and gradients as
the plain loss over full logits, no (N, V) tensor kept for the backward pass, the models it
refuses and why, and the trainer's losses with it and without it."""

import torch
import torch.nn.functional as F
import pytest

from conftest import gpt2_of_vocab, llama_of_vocab

import minilora as ml
from minilora.train import chunked_loss
from minilora.train.data import Examples
from minilora.train.task import Domain
from minilora.train.trainer import TrainConfig, Trainer

V = 300


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_the_loss_and_its_gradients_equal_the_plain_ones(bias, chunk, monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", chunk * V)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(V, 16, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (37,), generator=g)
    labels[::5] = -100
    inputs = [hidden, weight] + ([b] if bias else [])
    plain = F.cross_entropy(F.linear(hidden, weight, b), labels, ignore_index=-100, reduction="sum")
    ours = chunked_loss.summed_linear_cross_entropy(hidden, weight, b, labels)
    assert relative(ours, plain) < 1e-6
    for got, expected in zip(torch.autograd.grad(ours * 0.3, inputs), torch.autograd.grad(plain * 0.3, inputs)):
        assert relative(got, expected) < 1e-5


def test_no_tensor_of_all_logits_is_kept_for_the_backward_pass():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 16, generator=g, requires_grad=True)
    weight = torch.randn(V, 16, generator=g)
    labels = torch.randint(0, V, (512,), generator=g)
    largest = {}

    def measured(loss_fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss_fn()
        return max(sizes)

    largest["plain"] = measured(lambda: F.cross_entropy(hidden @ weight.t(), labels, reduction="sum"))
    largest["chunked"] = measured(lambda: chunked_loss.summed_linear_cross_entropy(hidden, weight, None, labels))
    assert largest["plain"] >= 512 * V and largest["chunked"] == 512 * 16  # ∂loss/∂H, the hidden states' size


def gpt2():
    return gpt2_of_vocab(V, positions=32)


def llama():
    return llama_of_vocab(V)


MODELS = {
    "gpt2 (tied head)": (gpt2, {"target_modules": ["c_attn"]}),
    "llama": (llama, {"target_modules": ["q_proj", "v_proj"]}),
    "llama, head trained in full": (llama, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
}


def batch():
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("name", MODELS)
def test_a_models_loss_and_adapter_gradients_equal_the_plain_ones(name, monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 5 * V)
    make, config = MODELS[name]
    model = ml.get_peft_model(make(), ml.LoraConfig(r=4, init_lora_weights=False, **config)).train()
    assert chunked_loss.unavailable(model) is None
    params = [p for p in model.parameters() if p.requires_grad]
    plain = Domain().summed_loss(model, batch())
    ours = Domain().summed_loss(model, batch(), chunked=True)
    assert relative(ours, plain) < 1e-6
    for got, expected in zip(torch.autograd.grad(ours, params), torch.autograd.grad(plain, params)):
        assert relative(got, expected) < 1e-5


def test_models_whose_logits_are_not_w_h_plus_b_keep_the_plain_loss():
    on_head = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "the LM head carries an adapter" in chunked_loss.unavailable(on_head)
    capped = llama()
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in chunked_loss.unavailable(capped)
    assert "has no LM head" in chunked_loss.unavailable(torch.nn.Linear(4, 4))


def examples(n, seed):
    ids = torch.randint(0, V, (n, 12), generator=torch.Generator().manual_seed(seed))
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, "domain")


def test_the_trainer_gives_the_same_losses_with_and_without_it(tmp_path):
    histories, logged = {}, []
    for chunked in (True, False):
        model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
        config = TrainConfig(steps=4, batch_size=4, eval_every=2, save_every=0, log_every=1, lr=1e-2,
                             progressbar=False, chunked_loss=chunked)
        result = Trainer(model, config, examples(16, 0), examples(8, 1), log=logged.append).train()
        histories[chunked] = torch.tensor([r["val_loss"] for r in result.history], dtype=torch.float64)
    torch.testing.assert_close(histories[True], histories[False], atol=1e-5, rtol=1e-5)
    assert not any("plain loss" in line for line in logged)
    Trainer(ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])),
            TrainConfig(steps=1, batch_size=4, progressbar=False), examples(8, 0), examples(4, 1), log=logged.append)
    assert any("the plain loss, with every logit at once: the LM head carries an adapter" in line for line in logged)


def test_qlora_trains_to_the_same_losses_with_the_chunked_loss_and_checkpointing():
    """A 4-bit base (its head stays a Linear): plain, chunked, and chunked with activation checkpointing
    and gradient accumulation give the same evaluation losses."""
    histories = {}
    for chunked, checkpointing in ((False, False), (True, False), (True, True)):
        base = llama()
        ml.quantize_model(base, ml.NF4Config(blocksize=32))
        model = ml.get_peft_model(base, ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        config = TrainConfig(steps=4, batch_size=2, grad_accum=2, eval_every=2, save_every=0, lr=1e-2,
                             progressbar=False, chunked_loss=chunked, gradient_checkpointing=checkpointing)
        trainer = Trainer(model, config, examples(16, 0), examples(8, 1), log=lambda line: None)
        assert trainer.chunked == chunked and base.is_activation_checkpointing == checkpointing
        result = trainer.train()
        histories[chunked, checkpointing] = torch.tensor([r["val_loss"] for r in result.history], dtype=torch.float64)
    plain = histories[False, False]
    assert len(plain) == 3 and plain[-1] < plain[0]
    torch.testing.assert_close(histories[True, False], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(histories[True, True], plain, atol=1e-5, rtol=1e-5)


def test_transformers_trainer_gets_the_same_losses_with_use_chunked_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer as HFTrainer, TrainingArguments

    from minilora.train import use_chunked_loss

    ids = torch.randint(3, V, (8, 12), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    losses = {}
    for chunked in (False, True):
        model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
        if chunked:
            assert use_chunked_loss(model) is model
        args = TrainingArguments(output_dir=str(tmp_path / str(chunked)), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1,
                                 use_cpu=True, seed=0, disable_tqdm=True)
        trainer = HFTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[chunked] = torch.tensor([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="use_chunked_loss: the LM head carries an adapter"):
        use_chunked_loss(ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])))


def test_gradient_checkpointing_gives_the_same_losses_and_gradients():
    grads = {}
    for checkpointing in (False, True):
        model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
        config = TrainConfig(steps=1, batch_size=4, progressbar=False, gradient_checkpointing=checkpointing)
        trainer = Trainer(model, config, examples(8, 0), examples(4, 1), log=lambda line: None)
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        model.train()
        recomputed = []
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        hook = layer.register_forward_hook(lambda *args: recomputed.append(1))
        loss = Domain().summed_loss(model, {k: v for k, v in examples(4, 2).tensors.items()}, chunked=True)
        loss.backward()
        hook.remove()
        assert len(recomputed) == (2 if checkpointing else 1)  # checkpointed: its forward runs again in backward
        grads[checkpointing] = [p.grad.clone() for p in trainer.params]
    for with_, without in zip(grads[True], grads[False]):
        assert relative(with_, without) < 1e-6
    with pytest.raises(ValueError, match="has no gradient_checkpointing_enable"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(gradient_checkpointing=True), examples(8, 0), examples(4, 1))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_preference_losses_kl_and_gradients_equal_the_plain_ones(loss, monkeypatch):
    from minilora.train.distributed import Processes
    from minilora.train.preference import PreferenceObjective

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 5 * V)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, V, (3, 2, 10), generator=g)
    labels = ids.clone()
    labels[:, :, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = {}
    for chunked in (False, True):
        model = ml.get_peft_model(llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         modules_to_save=["lm_head"], init_lora_weights=False))
        with torch.no_grad():  # a trained head copy: the reference's head is the original
            model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.1)
        config = TrainConfig(task="preference", chunked_loss=chunked, task_settings={"loss": loss})
        objective = PreferenceObjective(model, config, Processes())
        assert objective.chunked == chunked
        losses, reward, logps, kl = objective.per_pair(batch, keep_logits=True)
        grads = torch.autograd.grad(losses.sum(), [p for p in model.parameters() if p.requires_grad])
        results[chunked] = (losses, reward, kl, grads)
    plain, ours = results[False], results[True]
    for got, expected in zip(ours[:2], plain[:2]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (ours[2] is None) == (plain[2] is None) == (loss == "simpo")
    if loss != "simpo":
        torch.testing.assert_close(ours[2], plain[2], atol=1e-5, rtol=1e-5)
    for got, expected in zip(ours[3], plain[3]):
        assert relative(got, expected) < 1e-5
