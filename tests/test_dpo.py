"""Preference tuning: the losses against their papers' formulas, the reference as the model with its
adapter switched off, TRL's DPOTrainer as the oracle of a batch's loss, the trainer's features
(accumulation, resume, QLoRA, data parallel, the forgetting monitor), the command line and bad input."""

import contextlib
import copy
import json
import math
import random
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import first_step_gradients, interrupt_after
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minilora import LoraConfig, LoraModel, NF4Config, get_peft_model, quantize_model
from minilora.train.data import IGNORE, DataError, Tokens, load_tokenizer, text_windows
from minilora.train.tasks import load_examples
from minilora.train.distributed import Processes
from minilora.train.loss import dpo_loss, ipo_loss, simpo_loss
from minilora.train.preference import PreferenceObjective, PreferenceSettings, preference_rows, reference_logps, sequence_logps
from minilora.train.trainer import Trainer, TrainConfig

BYTES = load_tokenizer(None, "bytes")
T = 32
ANIMALS = ["cat", "dog", "owl", "fox", "hen", "elk"]


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def lora(model, dropout=0.0, **kw):
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], lora_dropout=dropout, **kw))


def pairs(n, seed, animals=ANIMALS):
    """The preferred answer names the animal in capitals; the rejected one hedges."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(animals)
        out.append({"prompt": f"Q: {w} {rng.randint(1, 99)}?\nA: ", "chosen": f"{w.upper()}.",
                    "rejected": rng.choice(["unsure", "no idea", "maybe"])})
    return out


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(tmp_path, n=64, seed=0, name="pairs.jsonl", animals=ANIMALS):
    return load_examples(write(tmp_path / name, pairs(n, seed, animals)), "preference", BYTES, T)


def config(**kw):
    """A preference run's TrainConfig; the PreferenceSettings' fields among `kw` go to its task_settings."""
    base = dict(task="preference", steps=12, batch_size=4, lr=1e-2, eval_every=4, save_every=4, progressbar=False,
                log_every=1)
    own = {f.name for f in fields(PreferenceSettings)}
    task_settings = {"beta": 0.1, **{k: v for k, v in kw.items() if k in own}}
    return TrainConfig(**{**base, **{k: v for k, v in kw.items() if k not in own}}, task_settings=task_settings)


def quiet(line):
    pass


def nonzero_b(model, seed=1):
    """A trained-looking adapter: B ≠ 0, so the policy differs from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ---------------------------------------------------------------------------------------------- losses
def test_dpo_loss_is_the_papers_formula_on_hand_computed_log_probs():
    # log π(y_w) = −5, log π(y_l) = −7, log π_ref(y_w) = −6, log π_ref(y_l) = −6, β = 0.1:
    # h = 0.1 · ((−5 + 6) − (−7 + 6)) = 0.2, ℓ = −log σ(0.2) = log(1 + e^−0.2)
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-12)
    smoothed = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=0.1, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * math.log(1 + math.exp(-0.2)) + 0.2 * math.log(1 + math.exp(0.2)),
                                            abs=1e-12)
    # policy = reference: log 2 whatever β; per pair, not reduced
    same = dpo_loss(t(-3.0, -9.0), t(-4.0, -1.0), t(-3.0, -9.0), t(-4.0, -1.0), beta=5.0)
    assert same.shape == (2,) and torch.allclose(same, torch.full((2,), math.log(2), dtype=torch.float64))


def test_ipo_and_simpo_are_their_papers_formulas():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # IPO: h = (−5 + 6)/2 − (−7 + 6)/4 = 0.75; (h − 1/(2·0.5))² = 0.0625
    assert ipo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), t(2), t(4), beta=0.5).item() == pytest.approx(0.0625)
    # SimPO: h = 2·(−5/2) − 2·(−7/4) − 0.5 = −1.5 + ... = −5 + 3.5 − 0.5 = −2; ℓ = log(1 + e²)
    assert simpo_loss(t(-5.0), t(-7.0), t(2), t(4), beta=2.0, gamma=0.5).item() == \
        pytest.approx(math.log(1 + math.exp(2.0)))


# ---------------------------------------------------------------------------------------------- data
def test_pairs_mask_the_prompt_and_score_only_the_answer(tmp_path):
    rows = [{"prompt": "Q: cat?\nA: ", "chosen": "CAT.", "rejected": "maybe"}]
    ex = load_examples(write(tmp_path / "p.jsonl", rows), "preference", BYTES, 24)
    assert ex.tensors["input_ids"].shape == (1, 2, 24) and len(ex) == 1
    n_prompt = len(b"Q: cat?\nA: ")
    for k, answer in enumerate(["CAT.", "maybe"]):
        ids, labels, mask = (ex.tensors[key][0, k] for key in ("input_ids", "labels", "attention_mask"))
        n_all = n_prompt + len(answer)
        assert BYTES.tokenizer.decode(ids[:n_all]) == rows[0]["prompt"] + answer and mask.sum() == n_all
        assert (labels[:n_prompt] == IGNORE).all() and torch.equal(labels[n_prompt:n_all], ids[n_prompt:n_all])
        assert (labels[n_all:] == IGNORE).all()
    # the sequence log-probability sums exactly the answer's tokens
    model = gpt2()
    logps, counts = sequence_logps(model, ex.tensors)
    assert counts.tolist() == [[4, 5]]
    with torch.no_grad():
        logits = model(input_ids=ex.tensors["input_ids"][0, 0:1]).logits[0].log_softmax(-1)  # (T, V)
    ids = ex.tensors["input_ids"][0, 0]
    by_hand = sum(logits[t - 1, ids[t]] for t in range(n_prompt, n_prompt + 4))
    assert logps[0, 0].item() == pytest.approx(by_hand.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------- reference
def test_reference_log_probs_are_the_base_models_exactly(tmp_path):
    ex = examples(tmp_path, n=6)
    base = gpt2()
    model = nonzero_b(lora(copy.deepcopy(base), dropout=0.1))
    model.train()  # the reference runs in eval mode whatever the model's mode: no dropout, one fixed function
    ref, counts = reference_logps(model, ex.tensors)
    with torch.no_grad():
        expected, _ = sequence_logps(base.eval(), ex.tensors)
    assert torch.equal(ref, expected) and not ref.requires_grad
    assert model.training and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    policy, _ = sequence_logps(model.eval(), ex.tensors)
    assert (policy - ref).abs().max() > 1e-3  # the adapter changes the policy, not the reference


def test_a_model_without_an_adapter_has_no_reference_to_switch_off(tmp_path):
    ex = examples(tmp_path, n=8)
    with pytest.raises(ValueError, match="no reference|none to switch off"):
        Trainer(gpt2().requires_grad_(True), config(), ex, ex, log=quiet)
    # the reference-free loss needs none
    Trainer(gpt2().requires_grad_(True), config(loss="simpo", beta=2.0), ex, ex, log=quiet)


# ---------------------------------------------------------------------------------------------- a named adapter as reference
def sft_model(quantized=False):
    """A GPT-2 with a fine-tuned-looking adapter "sft" (B ≠ 0), and that SFT model's own copy."""
    base = gpt2()
    if quantized:
        quantize_model(base, NF4Config(blocksize=32, double_quant=True), skip_modules=["lm_head"])
    model = nonzero_b(get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]), "sft"))
    return model, copy.deepcopy(model).eval()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("policy", ["copy", "stack"])
def test_the_adapter_reference_is_the_sft_models_exactly(tmp_path, quantized, policy):
    ex = examples(tmp_path, n=6)
    model, sft = sft_model(quantized)
    objective = PreferenceObjective(model, config(reference="adapter:sft", policy=policy), Processes())
    ref, _ = reference_logps(model, ex.tensors, policy="adapter:sft")
    with torch.no_grad():
        expected, _ = sequence_logps(sft, ex.tensors)
    assert torch.equal(ref, expected)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(".policy." in n for n in trains)  # only the policy adapter trains
    assert model.active_adapters == (["policy"] if policy == "copy" else ["sft", "policy"])
    with torch.no_grad():  # the policy starts where the reference is: the loss is log 2
        loss = objective.summed(ex.tensors).item() / 6
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        with_base = reference_logps(model, ex.tensors)[0]
    assert (with_base - expected).abs().max() > 1e-3  # "adapter off" is another model: the one before SFT


@pytest.mark.parametrize("policy", ["copy", "stack"])
def test_alignment_after_sft_trains_the_policy_and_leaves_the_sft_adapter(tmp_path, policy):
    model, sft = sft_model()
    train, val = examples(tmp_path, n=32), examples(tmp_path, 8, seed=1, name="val.jsonl")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".sft." in n}
    result = Trainer(model, config(steps=8, batch_size=4, eval_every=8, lr=3e-2, reference="adapter:sft",
                                   policy=policy), train, val, out=tmp_path / "run", log=quiet).train()
    assert result.history[0]["kl"] == 0.0 and result.history[0]["val_loss"] == pytest.approx(math.log(2))
    assert result.val_loss_after < result.val_loss_before - 0.01 and result.history[-1]["kl"] > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".sft." in n)
    saved = sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir() if p.is_dir())
    assert saved == (["policy"] if policy == "copy" else ["policy", "sft"])
    if policy == "stack":  # the two adapters as one that PEFT loads: "cat" is exact
        import peft

        model.add_weighted_adapter(["sft", "policy"], [1.0, 1.0], "aligned", combination_type="cat")
        x = val.tensors["input_ids"][:, 0]
        with torch.no_grad():
            stacked = model(input_ids=x).logits
            model.set_adapter("aligned")
            torch.testing.assert_close(model(input_ids=x).logits, stacked, rtol=1e-5, atol=1e-5)
            model.save_pretrained(tmp_path / "aligned", selected_adapters=["aligned"])
            theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "aligned" / "aligned").eval()
            assert theirs.peft_config["default"].r == 32  # two adapters of rank 8 on each of c_attn's q and v
            torch.testing.assert_close(theirs(input_ids=x).logits, stacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_the_mixed_reference_pass_gives_the_separate_passes_losses_and_gradients(tmp_path, quantized):
    ex = examples(tmp_path, n=8)
    grads, losses = {}, {}
    for reference_pass in ("separate", "mixed"):
        model, _ = sft_model(quantized)
        trainer = Trainer(model, config(steps=1, max_grad_norm=0, reference="adapter:sft", reference_pass=reference_pass),
                          ex, ex, log=quiet)
        model.train()
        per_pair = trainer.objective.per_pair(ex.tensors)[0]
        per_pair.sum().backward()
        losses[reference_pass] = per_pair.detach()
        grads[reference_pass] = {n: p.grad.clone() for n, p in trainer.named}
    torch.testing.assert_close(losses["mixed"], losses["separate"], rtol=1e-6, atol=1e-6)
    assert grads["mixed"].keys() == grads["separate"].keys() and len(grads["mixed"]) == 8
    for name, g in grads["separate"].items():
        assert g.abs().max() > 0 and (grads["mixed"][name] - g).norm() <= 1e-5 * g.norm(), name


def test_the_mixed_reference_pass_refuses_what_it_cannot_compute_exactly(tmp_path):
    ex = examples(tmp_path, n=8)
    with pytest.raises(ValueError, match="policy='copy'"):
        Trainer(sft_model()[0], config(reference="adapter:sft", policy="stack", reference_pass="mixed"), ex, ex, log=quiet)
    with pytest.raises(ValueError, match="reference='adapter:NAME'"):
        Trainer(lora(gpt2()), config(reference_pass="mixed"), ex, ex, log=quiet)
    model = nonzero_b(get_peft_model(gpt2(), LoraConfig(r=8, target_modules=["q", "v"], lora_dropout=0.1), "sft"))
    with pytest.raises(ValueError, match="drops out activations"):
        Trainer(model, config(reference="adapter:sft", reference_pass="mixed"), ex, ex, log=quiet)


def test_a_base_an_init_rewrote_is_refused_as_the_reference(tmp_path):
    ex = examples(tmp_path, n=8)
    model = get_peft_model(gpt2(), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="rewrote the base.*reference='adapter:default'"):
        Trainer(model, config(), ex, ex, log=quiet)
    trainer = Trainer(model, config(reference="adapter:default"), ex, ex, log=quiet)  # the adapter as it starts
    ref = reference_logps(model, ex.tensors, policy="adapter:default")[0]
    with torch.no_grad():
        original, _ = sequence_logps(gpt2().eval(), ex.tensors)
    torch.testing.assert_close(ref, original, rtol=1e-4, atol=1e-4)  # W_res + ΔW₀ = W, to fp32 rounding
    assert trainer.preference.settings.reference == "adapter:default"


def test_a_reference_adapter_the_model_lacks_or_a_bad_policy_is_refused(tmp_path):
    ex = examples(tmp_path, n=8)
    with pytest.raises(ValueError, match="holds no adapter 'sft'.*load_adapter"):
        Trainer(lora(gpt2()), config(reference="adapter:sft"), ex, ex, log=quiet)
    with pytest.raises(ValueError, match="'base'.*'adapter:NAME'"):
        Trainer(lora(gpt2()), config(reference="sft"), ex, ex, log=quiet)
    with pytest.raises(ValueError, match="'copy'.*'stack'"):
        Trainer(lora(gpt2()), config(reference="adapter:default", policy="both"), ex, ex, log=quiet)


# ---------------------------------------------------------------------------------------------- oracle: TRL
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "cat dog owl fox big small red blue is a the tell me about yes no".split()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("reference", ["base", "adapter:sft"])
@pytest.mark.parametrize("loss_type, ours", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_the_loss_of_a_batch_equals_trls_dpo_trainer(tmp_path, loss_type, ours, reference):
    """TRL is given the PEFT model and a frozen copy of its reference model (what it does for a model
    it does not recognise): the base, or the SFT model (base + an SFT adapter, merged). minilora loads
    the same adapters into one model and switches the adapter off, or to the SFT adapter, instead."""
    import peft
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = _word_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                      target_modules=["q_proj", "v_proj"]))
    nonzero_b(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    reference_model = copy.deepcopy(base)
    if reference == "adapter:sft":  # an SFT adapter of its own, and TRL's reference is the SFT model
        sft = nonzero_b(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])), seed=2)
        sft.save_pretrained(tmp_path / "sft")
        reference_model = sft.merge_and_unload()
    rows = [{"prompt": "tell me about cat", "chosen": " cat is big", "rejected": " no"},
            {"prompt": "tell me about the red dog", "chosen": " yes", "rejected": " the dog is small and blue"},
            {"prompt": "owl", "chosen": " a fox", "rejected": " a red owl is a bird"}]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss_type], report_to="none",
                     use_cpu=True, per_device_train_batch_size=3, max_length=None, bf16=False)
    trainer = DPOTrainer(model=theirs, ref_model=reference_model.eval(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

    if reference == "base":
        mine = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    else:  # the policy as the run starting from it would hold it: "policy", beside the frozen "sft"
        mine = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "sft", adapter_name="sft")
        mine.load_adapter(tmp_path / "adapter", "policy")
    pairs_ = preference_rows(Path("pairs.jsonl"), list(enumerate(rows, 1)), Tokens(tok), 16)
    objective = PreferenceObjective(mine, config(beta=0.3, loss=ours, reference=reference), Processes())
    with torch.no_grad():
        loss = objective.summed(pairs_.tensors).item() / len(rows)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    if ours == "dpo":  # and TRL's logged reward margin is ours too
        scores = objective.evaluate(pairs_, contextlib.nullcontext)
        assert scores["reward_margin"] == pytest.approx(trainer._metrics["train"]["rewards/margins"][-1], abs=1e-5)


# ---------------------------------------------------------------------------------------------- training
def test_reward_accuracy_on_held_out_pairs_rises(tmp_path):
    train = examples(tmp_path, n=64, seed=0, animals=ANIMALS[:4])
    held_out = examples(tmp_path, n=16, seed=1, name="held.jsonl", animals=ANIMALS[4:])  # animals never trained on
    model = lora(gpt2())
    result = Trainer(model, config(steps=16, batch_size=8, eval_every=8, lr=3e-2), train, held_out, log=quiet).train()
    first, last = result.history[0], result.history[-1]
    assert first["reward_accuracy"] == 0.0 and first["kl"] == 0.0 and first["val_loss"] == pytest.approx(math.log(2))
    assert last["reward_accuracy"] >= 0.9 and last["reward_margin"] > 0.05 and last["kl"] > 0
    assert result.val_loss_after < result.val_loss_before - 0.02
    assert last["chosen_logps"] - last["rejected_logps"] > first["chosen_logps"] - first["rejected_logps"]


def _first_gradients(tmp_path, **kw):
    model = nonzero_b(lora(gpt2()))
    trainer = Trainer(model, config(steps=1, max_grad_norm=0, **kw), examples(tmp_path, n=8), examples(tmp_path, 2),
                      log=quiet)
    return first_step_gradients(trainer)


def test_gradient_accumulation_and_precomputed_references_give_the_same_gradient(tmp_path):
    whole = _first_gradients(tmp_path, batch_size=4)
    accumulated = _first_gradients(tmp_path, batch_size=2, grad_accum=2)
    precomputed = _first_gradients(tmp_path, batch_size=4, precompute_ref=True)
    assert len(whole) == 8 and any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        assert torch.allclose(whole[name], accumulated[name], rtol=1e-5, atol=1e-8), name
        assert torch.allclose(whole[name], precomputed[name], rtol=1e-5, atol=1e-8), name


def test_precompute_ref_computes_the_reference_once(tmp_path):
    model = lora(gpt2())
    train = examples(tmp_path, n=16)
    trainer = Trainer(model, config(precompute_ref=True), train, train, log=quiet)
    with torch.no_grad():
        expected, _ = reference_logps(model, train.tensors)
    assert torch.allclose(trainer.train_set.tensors["ref_logps"], expected, atol=1e-5)
    calls = []
    original = model.disable_adapter

    def counting():
        calls.append(1)
        return original()

    model.disable_adapter = counting
    trainer._train_step()
    trainer.evaluate_preference = trainer.preference.evaluate(train, contextlib.nullcontext)
    assert calls == [1]  # only the evaluation ran the reference (for its KL); the step read the stored one  # a training step reads the stored reference


def _run(out, tmp_path, interrupt_at=None, resume=False):
    torch.manual_seed(123)
    model = lora(gpt2(), dropout=0.1)  # dropout: the RNG state must come back too
    general = text_windows(" ".join(r["prompt"] for r in pairs(20, 5)), BYTES, T)
    trainer = Trainer(model, config(steps=8, save_every=3, grad_accum=2, batch_size=2), examples(tmp_path, 32),
                      examples(tmp_path, 4, seed=1, name="val.jsonl"), retain=general, out=out, log=quiet)
    if interrupt_at is not None:
        interrupt_after(trainer, interrupt_at)
    return model, trainer.train(resume=resume)


def test_ctrl_c_and_resume_is_bit_exact(tmp_path):
    whole, whole_result = _run(tmp_path / "whole", tmp_path)
    _, stopped = _run(tmp_path / "parts", tmp_path, interrupt_at=5)
    assert stopped.stop_reason == "interrupted" and stopped.steps_done == 5
    resumed, result = _run(tmp_path / "parts", tmp_path, resume=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert result.history == whole_result.history
    assert all(h["retain_loss"] > 0 and "reward_accuracy" in h for h in result.history)


def test_the_forgetting_monitor_guards_the_retain_set_during_alignment(tmp_path):
    # the retain text is the rejected answers: DPO pushes their probability down, so the retain loss rises
    train = examples(tmp_path, n=64)
    rejected = " ".join(r["rejected"] for r in pairs(40, 3))
    retain = text_windows(rejected, BYTES, T)
    result = Trainer(lora(gpt2()), config(steps=40, eval_every=2, lr=5e-2, forgetting_budget=0.01), train,
                     examples(tmp_path, 4, seed=1, name="val.jsonl"), retain=retain, log=quiet).train()
    assert "forgetting budget exceeded" in result.stop_reason and result.steps_done < 40
    assert result.history[-1]["forgetting"] > 0.01


def test_qlora_with_paged_adamw_trains_against_the_quantized_base(tmp_path):
    base = gpt2()
    quantize_model(base, NF4Config(blocksize=32, double_quant=True), skip_modules=["lm_head"])
    reference = copy.deepcopy(base).eval()
    model = lora(base)
    train, val = examples(tmp_path, n=32), examples(tmp_path, 8, seed=1, name="val.jsonl")
    with torch.no_grad():
        assert torch.equal(reference_logps(model, val.tensors)[0], sequence_logps(reference, val.tensors)[0])
    result = Trainer(model, config(steps=8, batch_size=4, eval_every=8, lr=3e-2, optimizer="paged_adamw"), train, val,
                     log=quiet).train()
    assert result.val_loss_after < result.val_loss_before - 0.01
    assert result.history[-1]["reward_accuracy"] > 0.5


def test_two_processes_train_the_adapter_a_single_process_would(ddp_runs):
    from safetensors.torch import load_file

    rank0, rank1 = (load_file(ddp_runs / "ddp" / "dpo" / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(ddp_runs / "single" / "dpo" / "rank0.safetensors")
    assert rank0.keys() == single.keys() and len(rank0) == 10  # 8 adapter tensors, the reward accuracy, a loss
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        error = (rank0[name] - single[name]).norm()
        assert error <= 1e-5 * single[name].norm() + 1e-12, (name, error)


# ---------------------------------------------------------------------------------------------- command line
def test_finetune_task_preference_from_the_command_line(tmp_path):
    from minilora.cli import main

    gpt2().save_pretrained(tmp_path / "model")
    data = write(tmp_path / "pairs.jsonl", pairs(40, 0))
    retain = tmp_path / "general.txt"
    retain.write_text(" ".join(r["prompt"] for r in pairs(40, 5)))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(data), "--task", "preference",
                 "--beta", "0.1", "--loss", "ipo", "--precompute-ref", "--tokenizer", "bytes", "--seq-len", str(T),
                 "--retain", str(retain), "--steps", "6", "--eval-every", "3", "--lr", "1e-2", "--out", str(out),
                 "--no-progressbar"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert [h["step"] for h in result["history"]] == [0, 3, 6]
    assert all(h["retain_loss"] > 0 and h["kl"] >= 0 for h in result["history"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(data), "--task", "preference",
                 "--beta", "0", "--tokenizer", "bytes", "--out", str(tmp_path / "o2")]) == 2


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
def test_sft_then_dpo_against_the_sft_adapter_from_the_command_line(tmp_path, qlora):
    """SFT gives an adapter; DPO starts from it (--adapter), measures against it (--reference) and
    saves the aligned policy as its own adapter, with no merge, on a full-precision or 4-bit base."""
    from minilora.cli import main

    gpt2().save_pretrained(tmp_path / "model")
    text = tmp_path / "domain.txt"
    text.write_text(" ".join(r["prompt"] + r["chosen"] for r in pairs(60, 2)))
    data = write(tmp_path / "pairs.jsonl", pairs(40, 0))
    common = ["--model", str(tmp_path / "model"), "--tokenizer", "bytes", "--seq-len", str(T), "--steps", "4",
              "--eval-every", "4", "--lr", "1e-2", "--no-progressbar"] + (["--qlora"] if qlora else [])
    assert main(["finetune", *common, "--data", str(text), "--out", str(tmp_path / "sft")]) == 0
    assert main(["finetune", *common, "--data", str(data), "--task", "preference", "--adapter",
                 str(tmp_path / "sft" / "adapter"), "--reference", "adapter:sft", "--out", str(tmp_path / "dpo")]) == 0
    history = json.loads((tmp_path / "dpo" / "result.json").read_text())["history"]
    assert history[0]["kl"] == 0.0 and history[0]["val_loss"] == pytest.approx(math.log(2))  # starts at the SFT model
    assert history[-1]["kl"] > 0
    assert (tmp_path / "dpo" / "adapter" / "policy" / "adapter_model.safetensors").is_file()
    assert main(["finetune", *common, "--data", str(data), "--task", "preference", "--adapter",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")]) == 2


# ---------------------------------------------------------------------------------------------- bad input
def test_identical_answers_are_counted_left_out_and_warned_about(tmp_path):
    rows = pairs(5, 0)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = rows[3]["chosen"]
    with pytest.warns(UserWarning, match=r"2 pair\(s\) have identical chosen and rejected answers \(line 2, 4\)"):
        ex = load_examples(write(tmp_path / "p.jsonl", rows), "preference", BYTES, T)
    assert len(ex) == 3


def test_answers_cut_to_nothing_say_how_many_and_the_length_needed(tmp_path):
    rows = pairs(4, 0)
    rows[2]["prompt"] = "x" * 50
    rows[3]["prompt"] = "y" * 45
    with pytest.raises(DataError, match=r"in 2 pair\(s\) \(first at line 3\) --seq-len 32 cuts the answers to "
                                        r"nothing.*at least 51"):
        load_examples(write(tmp_path / "p.jsonl", rows), "preference", BYTES, T)


def test_bad_pairs_and_settings_say_what_and_where(tmp_path):
    write(tmp_path / "p.jsonl", [pairs(1, 0)[0], {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"p.jsonl line 2: missing field 'rejected'"):
        load_examples(tmp_path / "p.jsonl", "preference", BYTES, T)
    write(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": ["b"], "rejected": "c"}])
    with pytest.raises(DataError, match=r"q.jsonl line 1: 'chosen' must be a string"):
        load_examples(tmp_path / "q.jsonl", "preference", BYTES, T)
    (tmp_path / "p.txt").write_text("text")
    with pytest.raises(DataError, match="preference data must be .jsonl"):
        load_examples(tmp_path / "p.txt", "preference", BYTES, T)
    for bad, message in ((dict(beta=0.0), "beta must be > 0"), (dict(beta=-1.0), "beta must be > 0"),
                         (dict(loss="kto"), "unknown preference loss 'kto'; choose from dpo, ipo, simpo"),
                         (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
                         (dict(parallel="fsdp"), "--task preference runs under DDP, not FSDP")):
        with pytest.raises(ValueError, match=message):
            config(**bad).check()


def test_preference_settings_live_with_their_task(tmp_path):
    config = TrainConfig(task="preference", task_settings={"loss": "simpo", "simpo_gamma": 1.0})
    assert config.task_settings == PreferenceSettings(loss="simpo", simpo_gamma=1.0)
    assert {"loss": "simpo", "simpo_gamma": 1.0, "beta": 0.1}.items() <= config.settings().items()
    assert TrainConfig(task="domain").task_settings is None and "beta" not in TrainConfig().settings()
    with pytest.raises(ValueError, match="task_settings: gamma is not a setting of task='preference'"):
        TrainConfig(task="preference", task_settings={"gamma": 1.0})
    with pytest.raises(ValueError, match="task='instruction' has no settings of its own"):
        TrainConfig(task="instruction", task_settings=PreferenceSettings())
    from minilora.train import checkpoint

    earlier_record = {**TrainConfig().settings(), "loss": "dpo", "beta": 0.1, "label_smoothing": 0.0,
                      "simpo_gamma": 0.5, "precompute_ref": False}  # every run recorded these before
    assert checkpoint.differences(earlier_record, TrainConfig().settings()) == []
    assert checkpoint.differences({**earlier_record, "beta": 0.3}, TrainConfig().settings()) == ["beta"]
    from minilora.cli import main

    data = tmp_path / "d.txt"
    data.write_text("text " * 50)
    with pytest.raises(SystemExit):  # argparse's error: exit status 2
        main(["finetune", "--model", str(tmp_path), "--data", str(data), "--beta", "0.3"])


# ---------------------------------------------------------------------------------------------- embedded default
def test_the_generated_finance_pairs_fit_the_embedded_defaults_windows(tmp_path):
    from minilora.experiments.corpus import preference_pairs
    from minilora.experiments.dpo import pairs as demo_pairs, sft_model

    records = preference_pairs(200, 0)
    assert len({r["chosen"] for r in records}) > 150 and all(r["chosen"] != r["rejected"] for r in records)
    ex = demo_pairs(200, 0, 64)  # would raise if any answer were cut to nothing
    answer_tokens = (ex.tensors["labels"][:, :, 1:] != IGNORE).sum(-1)
    lengths = [len((r["prompt"] + r[k]).encode()) for r in records for k in ("chosen", "rejected")]
    assert max(lengths) <= 64 and (answer_tokens > 0).all()
    with pytest.raises(ValueError, match="starts from the lora_article adapter.*--strategies lora_article,lora_article_dpo"):
        sft_model("lora_article_dpo", gpt2(), tmp_path, quiet)
