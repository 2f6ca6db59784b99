"""Adapters trained together (train/together.py) equal separate runs, adapter by adapter."""

import copy
import json

import pytest
import torch

from conftest import interrupt_after, make
from minilora import LoraConfig, get_peft_model
from minilora.routing import TagRouter
from minilora.train import TrainConfig, Trainer
from minilora.train.data import Examples
from minilora.train.together import AdapterData, TogetherTrainer, rows_per_adapter

NAMES = ("finance", "law", "med", "code")
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}


def examples(seed: int, n: int, length: int = 12) -> Examples:
    """n rows of one "domain": token ids drawn from its own slice of the vocabulary, and some padding."""
    g = torch.Generator().manual_seed(seed)
    low = 8 + 20 * (seed % 5)  # the domain: seeds 0, 5, 10 ... share a slice of the vocabulary
    ids = torch.randint(low, low + 20, (n, length), generator=g)
    labels = ids.clone()
    labels[::3, -3:] = -100  # every third row is shorter: its padding is not scored
    return Examples({"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}, "domain")


def domains(names=NAMES, retain=None) -> dict:
    return {name: AdapterData(examples(i, 24), examples(i + 10, 6), retain) for i, name in enumerate(names)}


def with_adapters(family: str, names=NAMES):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], lora_dropout=0.0)
    model = get_peft_model(make(family), copy.deepcopy(config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, copy.deepcopy(config))
    return model


def settings(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 20, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "eval_every": 10,
                          "progressbar": False, "weight_decay": 0.01, "max_grad_norm": 0.5, "save_every": 0, **kw})


def weights_of(model, name: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal to `rel` relative, as a whole: ‖got − want‖ ≤ rel · ‖want‖."""
    return bool((got - want).norm() <= rel * want.norm())


def separate_run(model, name: str, data: AdapterData, **kw) -> dict:
    model.set_adapter(name)
    Trainer(model, settings(batch_size=2, **kw), data.train, data.val, data.retain, log=lambda _: None).train()
    return weights_of(model, name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_four_adapters_together_equal_four_separate_runs(family):
    start, data = with_adapters(family), domains()
    together = copy.deepcopy(start)
    result = TogetherTrainer(together, settings(adapter_mix="equal"), data, log=lambda _: None).train()
    assert result.steps_done == 20 and set(result.adapters) == set(NAMES)
    for name in NAMES:
        alone = separate_run(copy.deepcopy(start), name, data[name])
        got = weights_of(together, name)
        assert got.keys() == alone.keys() and got
        for key in got:
            assert close(got[key], alone[key]), key
        assert any(not torch.equal(got[k], weights_of(start, name)[k]) for k in got)  # it did train


def test_adapters_with_their_own_head_equal_separate_runs():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    start = get_peft_model(make("llama"), copy.deepcopy(config), adapter_name="finance")
    start.add_adapter("law", copy.deepcopy(config))
    data, together = domains(NAMES[:2]), copy.deepcopy(start)
    trainer = TogetherTrainer(together, settings(steps=8, adapter_mix="equal", batch_size=4), data, log=lambda _: None)
    assert not trainer.chunked  # each row's own head: the logits are formed, so the runs of their own form them too
    trainer.train()
    for name in NAMES[:2]:
        alone = copy.deepcopy(start)
        alone.set_adapter(name)
        Trainer(alone, settings(steps=8, batch_size=2, chunked_loss=False), data[name].train, data[name].val,
                log=lambda _: None).train()
        mine, theirs = weights_of(together, name), weights_of(alone, name)
        assert any("modules_to_save" in k for k in mine)  # the head's copy trained too
        for key in mine:
            assert close(mine[key], theirs[key]), key


def test_an_adapter_that_stops_keeps_its_best_while_the_others_go_on():
    start, data = with_adapters("llama", NAMES[:2]), domains(NAMES[:2])
    data["law"].retain = examples(30, 6)  # law is watched for forgetting, with no budget to spare
    model = copy.deepcopy(start)
    trainer = TogetherTrainer(model, settings(adapter_mix="equal", eval_every=5, forgetting_budget=0.0,
                                              batch_size=4), data, log=lambda _: None)
    result = trainer.train()
    law = result.adapters["law"]
    assert law.stop_reason.startswith("forgetting budget exceeded at step 5") and law.best_step == 0
    for key, value in weights_of(model, "law").items():  # back to where it started
        assert torch.equal(value, weights_of(start, "law")[key])
    assert result.adapters["finance"].stop_reason == "completed" and result.steps_done == 20
    alone = separate_run(copy.deepcopy(start), "finance", data["finance"])
    for key, value in weights_of(model, "finance").items():
        assert close(value, alone[key]), key


def test_resume_is_exact_and_the_run_saves_each_adapter_and_its_router(tmp_path):
    start, data = with_adapters("gpt2", NAMES[:3]), domains(NAMES[:3])
    straight = copy.deepcopy(start)
    TogetherTrainer(straight, settings(steps=8, eval_every=4), data, out=tmp_path / "a", log=lambda _: None).train()
    stopped = copy.deepcopy(start)
    trainer = TogetherTrainer(stopped, settings(steps=8, eval_every=4), data, out=tmp_path / "b", log=lambda _: None)
    interrupt_after(trainer, 3)
    assert trainer.train().stop_reason == "interrupted"
    resumed = copy.deepcopy(start)
    TogetherTrainer(resumed, settings(steps=8, eval_every=4), data, out=tmp_path / "b",
                    log=lambda _: None).train(resume=True)
    for name in NAMES[:3]:
        for key, value in weights_of(resumed, name).items():
            assert torch.equal(value, weights_of(straight, name)[key]), key
    saved = tmp_path / "b" / "adapters"
    router = TagRouter.load(saved)
    assert router.adapters == list(NAMES[:3])
    assert router.route(["<domain=law> a question"]) == (["law"], ["a question"])
    loaded = get_peft_model(make("gpt2"), LoraConfig(target_modules=["c_attn"]), adapter_name="unused")
    for name in NAMES[:3]:
        assert json.loads((saved / name / "adapter_config.json").read_text())["r"] == 4
        loaded.load_adapter(saved / name, adapter_name=name)
    ids = examples(0, 3).tensors["input_ids"]
    names = ["law", "finance", "med"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids, adapter_names=names).logits,
                                   resumed.eval()(input_ids=ids, adapter_names=names).logits)


def test_rows_per_adapter():
    assert rows_per_adapter({"a": 10, "b": 30}, 8, "equal") == {"a": 4, "b": 4}
    assert rows_per_adapter({"a": 10, "b": 30}, 8, "proportional") == {"a": 2, "b": 6}
    assert rows_per_adapter({"a": 1, "b": 1000, "c": 1000}, 4, "proportional") == {"a": 1, "b": 2, "c": 1}
    with pytest.raises(ValueError, match="do not divide them"):
        rows_per_adapter({"a": 10, "b": 30, "c": 5}, 8, "equal")
    with pytest.raises(ValueError, match="cannot give each of the 3 adapters a row"):
        rows_per_adapter({"a": 10, "b": 30, "c": 5}, 2, "proportional")


def test_what_cannot_train_together_is_refused():
    model, data = with_adapters("llama", NAMES[:2]), domains(NAMES[:2])
    with pytest.raises(ValueError, match="has no adapter 'med'"):
        TogetherTrainer(model, settings(), {**data, "med": data["law"]})
    with pytest.raises(ValueError, match="replay"):
        TogetherTrainer(model, settings(replay_ratio=0.5), data)
    with pytest.raises(ValueError, match="unknown adapter_mix"):
        TogetherTrainer(model, settings(adapter_mix="round-robin"), data)
    model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head.weight trains and belongs to no adapter"):
        TogetherTrainer(model, settings(), data)
