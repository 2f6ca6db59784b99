"""Exercise 10: forgetting measured on a retain set, and the budget rule of minilora's forgetting monitor."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model
from minilora.train.monitor import Monitor  # the monitor the tutorial's chapter 9 shows (its module path)

V = 64


def lora_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=32, bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]))


def text(low, high, seed):
    """Token sequences drawn from [low, high): the domain is one half of the vocabulary, the retain set the other."""
    return torch.randint(low, high, (8, 24), generator=torch.Generator().manual_seed(seed))


def test_the_loss_is_transformers_loss(ex):
    """Your mean token loss equals model(input_ids, labels=input_ids).loss (the same fp32 mean: ~1e-6)."""
    model = lora_gpt2().eval()
    ids = text(0, V, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    loss = ex.mean_token_loss(model, ids)
    assert isinstance(loss, float) and abs(loss - expected) < 1e-5


def test_training_on_the_domain_forgets_the_retain_set(ex):
    """Ten AdamW steps on tokens 0..31: the domain loss falls (by ~0.09 nats), the retain loss (tokens
    32..63) rises (by ~0.07: the model moved probability towards the domain's tokens), forgetting =
    after − before (to float rounding), every reported number is the model's own loss afterwards,
    and only LoRA's parameters moved."""
    model = lora_gpt2().eval()  # no dropout: the numbers are deterministic
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    domain, retain = text(0, V // 2, seed=2), text(V // 2, V, seed=3)
    report = ex.train_and_measure(model, domain, retain, steps=10, lr=3e-2)
    assert report["domain_after"] < report["domain_before"] - 0.05
    assert report["forgetting"] > 0.04
    assert abs(report["forgetting"] - (report["retain_after"] - report["retain_before"])) < 1e-9
    with torch.no_grad():
        assert abs(report["retain_after"] - model(input_ids=retain, labels=retain).loss.item()) < 1e-5
        assert abs(report["domain_after"] - model(input_ids=domain, labels=domain).loss.item()) < 1e-5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with model.disable_adapter(), torch.no_grad():  # the base model itself forgot nothing
        assert abs(model(input_ids=retain, labels=retain).loss.item() - report["retain_before"]) < 1e-5


HISTORIES = [
    ([(0, 3.0, 1.0), (10, 2.5, 1.2), (20, 2.6, 1.3), (30, 2.2, 1.6)], 0.5),  # the tutorial's: over budget at 30
    ([(0, 3.0, 1.0), (10, 2.5, 1.1), (20, 2.4, 1.2), (30, 2.3, 1.3)], 0.5),  # within budget throughout
    ([(0, 3.0, 1.0), (10, 3.1, 2.0)], 0.5),  # only forgets: keeps step 0, the original model
    ([(0, 3.0, 1.0), (5, 2.0, 1.5), (10, 1.0, 1.51)], 0.5),  # at 10: 0.51 > 0.5, stopped; 5 is kept
]


def test_the_budget_decision_is_the_monitor_s(ex):
    """For each history, (best step, stop step) equal those of minilora's Monitor(forgetting_budget=…)."""
    for history, budget in HISTORIES:
        monitor = Monitor(forgetting_budget=budget)
        stop = None
        for step, val, retain in history:
            monitor.observe(step, val, retain)
            if monitor.stop_reason:
                stop = step
                break
        assert ex.monitor_decision(history, budget) == (monitor.best_step, stop), history
