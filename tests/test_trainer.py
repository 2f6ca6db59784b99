"""The trainer: data for each task, prompt masking, the forgetting monitor, replay, checkpoints,
resume, Ctrl-C, non-finite losses, and a fine-tune of every task that lowers its loss."""

import json
import random
import signal

import pytest
import torch
from conftest import first_step_gradients, interrupt_after
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, T5Config, \
    T5ForConditionalGeneration

from minilora import LoraConfig, LoraModel, get_peft_model
from minilora.experiments.corpus import DOMAIN, GENERAL, generate
from minilora.train.data import IGNORE, DataError, Examples, instruction_prompt, load_tokenizer, text_windows
from minilora.train.batches import replay_count
from minilora.train.tasks import load_examples, summed_loss
from minilora.train.trainer import NonFiniteLoss, Trainer, TrainConfig

BYTES = load_tokenizer(None, "bytes")
T = 32


def gpt2(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


def lora_gpt2(seed=0, dropout=0.0):
    model = get_peft_model(gpt2(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=dropout))
    return model


def windows(templates, n, seed):
    return text_windows(generate(templates, n, seed), BYTES, T)


def noise(n_rows, seed=0):
    """Uniformly random bytes: training on text can only make a model worse at predicting them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n_rows, T), generator=g)
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, "domain")


def config(**kw):
    base = dict(steps=12, batch_size=4, lr=1e-2, eval_every=4, save_every=4, progressbar=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def quiet(line):
    pass


# ---------------------------------------------------------------------------------------------- data
def test_instruction_rows_mask_the_prompt(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "output": "hi"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_examples(path, "instruction", BYTES, 48)
    for row, ids, labels, mask in zip(rows, examples.tensors["input_ids"], examples.tensors["labels"],
                                      examples.tensors["attention_mask"]):
        prompt = instruction_prompt(row["instruction"], row.get("input", ""))
        n_prompt, n_all = len(prompt.encode()), len((prompt + row["output"]).encode())
        assert BYTES.tokenizer.decode(ids[:n_all]) == prompt + row["output"]
        assert (labels[:n_prompt] == IGNORE).all() and torch.equal(labels[n_prompt:n_all], ids[n_prompt:n_all])
        assert (labels[n_all:] == IGNORE).all() and mask.sum() == n_all
    assert "Input:" not in BYTES.tokenizer.decode(examples.tensors["input_ids"][1])

    # the loss counts only the output tokens: changing the prompt's labels' logits changes nothing
    model = gpt2()
    batch = examples.rows(torch.arange(2))
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
    assert torch.allclose(summed_loss(model, batch, "instruction"), manual)
    assert scored.sum() == len(b"5") + len(b"hi")


BAD_DATA = [  # (file name, its text or None for no file, task, what the error says)
    ("missing.txt", None, "domain", "no such data file"),
    ("empty.txt", "  \n", "domain", "empty.txt is empty"),
    ("short.txt", "too short", "domain", "9 tokens, fewer than one sequence of 32"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', "instruction",
     "bad.jsonl line 3: not valid JSON"),
    ("field.jsonl", '{"instruction": "a"}\n', "instruction", "line 1: missing field 'output'"),
    ("data.csv", "a,b\n", "domain", "use .txt"),
    ("labels.txt", "good film", "classification", "classification data must be .jsonl"),
    ("long.jsonl", json.dumps({"instruction": "x" * 40, "output": "y"}), "instruction",
     "line 1: the prompt alone is 62 tokens"),
]


@pytest.mark.parametrize("name, text, task, message", BAD_DATA, ids=[row[0] for row in BAD_DATA])
def test_bad_data_says_what_and_where(tmp_path, name, text, task, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_examples(tmp_path / name, task, BYTES, T)


def test_the_models_own_tokenizer_is_used(tmp_path):
    from test_qlora import minilm_dir

    tokens = load_tokenizer(minilm_dir())
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "a good film", "label": "pos"}\n{"text": "dull", "label": "neg"}\n')
    examples = load_examples(path, "classification", tokens, 8)
    assert examples.label_names == ["neg", "pos"] and examples.tensors["labels"].tolist() == [1, 0]
    first = examples.tensors["input_ids"][0].tolist()
    assert first[0] == tokens.tokenizer.cls_token_id and tokens.tokenizer.sep_token_id in first
    with pytest.raises(DataError, match="pass --tokenizer bytes"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------- replay
def test_replay_mixes_the_requested_fraction():
    train, replay = windows(DOMAIN, 200, 0), noise(50)
    trainer = Trainer(lora_gpt2(), config(batch_size=3, grad_accum=2, replay_ratio=0.3), train, train, replay=replay,
                      log=quiet)
    replayed = 0
    for step in range(1, 21):
        rows = trainer._global_batch(step)["input_ids"]
        assert len(rows) == 6
        replayed += sum(any(torch.equal(r, x) for x in replay.tensors["input_ids"]) for r in rows)
    assert replayed == sum(replay_count(s, 6, 0.3) for s in range(1, 21)) == 36  # ⌊0.3 · 6 · 20⌋
    with pytest.raises(ValueError, match="needs a replay set"):
        Trainer(lora_gpt2(), config(replay_ratio=0.3), train, train, log=quiet)


# ---------------------------------------------------------------------------------------------- monitor
def test_early_stopping_restores_the_best_adapter(tmp_path):
    model = lora_gpt2()
    # validation on random bytes: learning text soon makes it worse, so training stops early
    trainer = Trainer(model, config(steps=60, eval_every=2, patience=2), windows(DOMAIN, 200, 0), noise(8),
                      out=tmp_path, log=quiet)
    result = trainer.train()
    losses = {h["step"]: h["val_loss"] for h in result.history}
    best = min(losses, key=losses.get)
    assert result.stop_reason.startswith("early stop") and result.steps_done == best + 4 < 60
    assert result.best_step == best and losses[result.steps_done] > losses[best]
    assert trainer.evaluate(noise(8)) == result.val_loss_after == losses[best]  # the weights of the best step
    reloaded = LoraModel.from_pretrained(gpt2(), tmp_path / "adapter").eval()  # the adapter file is the best too
    rows = noise(8).tensors
    with torch.no_grad():
        loss = summed_loss(reloaded, rows, "domain").item() / rows["labels"][:, 1:].numel()
    assert loss == pytest.approx(losses[best], rel=1e-6)
    assert json.loads((tmp_path / "result.json").read_text())["best_step"] == best


def test_forgetting_budget_stops_training():
    # the retain set is random bytes: learning text soon raises its loss (all weights train: fast)
    trainer = Trainer(gpt2(), config(steps=60, eval_every=2, forgetting_budget=0.02),
                      windows(DOMAIN, 200, 0), windows(DOMAIN, 20, 1), retain=noise(8), log=quiet)
    result = trainer.train()
    assert "forgetting budget exceeded" in result.stop_reason and result.steps_done < 60
    last = result.history[-1]
    assert last["forgetting"] > 0.02 and last["retain_loss"] - result.retain_loss_before == last["forgetting"]
    kept = next(h for h in result.history if h["step"] == result.best_step)
    assert kept["forgetting"] <= 0.02 and result.retain_loss_after == kept["retain_loss"]


# ---------------------------------------------------------------------------------------------- resume
def _run(out, interrupt_at=None, resume=False):
    torch.manual_seed(123)
    random.seed(0)
    model = lora_gpt2(dropout=0.1)  # dropout: the RNG state must come back too
    trainer = Trainer(model, config(replay_ratio=0.25, save_every=5), windows(DOMAIN, 200, 0), windows(DOMAIN, 20, 1),
                      retain=windows(GENERAL, 20, 2), replay=windows(GENERAL, 40, 3), out=out, log=quiet)
    if interrupt_at is not None:
        interrupt_after(trainer, interrupt_at)
    return model, trainer.train(resume=resume)


def test_ctrl_c_checkpoints_and_resume_is_bit_exact(tmp_path):
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    whole, whole_result = _run(tmp_path / "whole")
    _, stopped = _run(tmp_path / "parts", interrupt_at=7)
    assert stopped.stop_reason == "interrupted" and stopped.steps_done == 7
    state = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 7 and not (tmp_path / "parts" / "adapter").exists()
    resumed, result = _run(tmp_path / "parts", resume=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert result.history == whole_result.history
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert lines("parts") == lines("whole")
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back


def test_a_checkpoint_with_the_earlier_parameter_names_resumes_bit_exact(tmp_path):
    """Checkpoints written before parameters took PEFT's names (`model.<path>`) resume as they were."""
    whole, whole_result = _run(tmp_path / "whole")
    _run(tmp_path / "parts", interrupt_at=7)
    path = tmp_path / "parts" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for key in ("trainable", "best"):
        assert all(n.startswith("base_model.model.") for n in state[key])
        state[key] = {n.replace("base_model.model.", "model.", 1): t for n, t in state[key].items()}
    torch.save(state, path)
    resumed, result = _run(tmp_path / "parts", resume=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert result.history == whole_result.history


def test_training_runs_in_a_worker_thread_and_leaves_ctrl_c_alone():
    import threading

    outcome = {}

    def work():
        try:
            model = lora_gpt2()
            trainer = Trainer(model, config(steps=3, eval_every=3), windows(DOMAIN, 40, 0), windows(DOMAIN, 8, 1), log=quiet)
            outcome["result"] = trainer.train()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread to fail the test
            outcome["error"] = err

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].steps_done == 3 and outcome["result"].stop_reason == "completed"
    assert signal.getsignal(signal.SIGINT) is before


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path):
    model = lora_gpt2()
    calls = {"n": 0}
    bad_calls = {3} | set(range(8, 100))  # forward passes (= steps) that produce NaN

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] in bad_calls else output

    model.get_base_model().transformer.ln_f.register_forward_hook(poison)
    trainer = Trainer(model, config(steps=30, eval_every=100, save_every=2, max_bad_steps=3),
                      windows(DOMAIN, 200, 0), windows(DOMAIN, 4, 1), out=tmp_path, log=quiet)
    trainer.evaluate = lambda examples: 1.0  # no forward passes outside training steps
    snapshots = {}
    step = trainer._train_step

    def recorded():
        out = step()
        snapshots[trainer.step] = [p.detach().clone() for p in trainer.params]
        return out

    trainer._train_step = recorded
    with pytest.raises(NonFiniteLoss, match=r"3 steps in a row \(up to step 10\).*checkpoint.pt \(step 6\).*lower "
                                            "learning rate"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # step 3 was skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))  # step 4 trained again
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(t).all() for t in state["trainable"].values())


# ---------------------------------------------------------------------------------------------- tasks
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_task_lowers_its_validation_loss(tmp_path):
    rng = random.Random(0)
    words = ["cat", "dog", "owl", "fox"]
    instr = [{"instruction": "Name the animal", "input": w, "output": w.upper()} for w in words * 10]
    cls_rows = [{"text": f"{rng.choice(['good', 'great', 'fine'])} {w}", "label": "pos"} for w in words * 5] + \
               [{"text": f"{rng.choice(['bad', 'awful', 'poor'])} {w}", "label": "neg"} for w in words * 5]
    rng.shuffle(cls_rows)
    s2s = [{"source": f"reverse {w}", "target": w[::-1]} for w in words * 10]

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, vocab_size=256, num_labels=2))
    t5 = T5ForConditionalGeneration(T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=256,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    cases = {
        "domain": (gpt2(), _jsonl(tmp_path / "d.jsonl", [{"text": generate(DOMAIN, 60, 0)}]), "CAUSAL_LM"),
        "instruction": (gpt2(), _jsonl(tmp_path / "i.jsonl", instr), "CAUSAL_LM"),
        "classification": (bert, _jsonl(tmp_path / "c.jsonl", cls_rows), "SEQ_CLS"),
        "seq2seq": (t5, _jsonl(tmp_path / "s.jsonl", s2s), "SEQ_2_SEQ_LM"),
    }
    for task, (model, path, task_type) in cases.items():
        train, val = load_examples(path, task, BYTES, 64).split(0.2)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], task_type=task_type))
        result = Trainer(model, config(task=task, steps=30, lr=2e-2, eval_every=10), train, val, log=quiet).train()
        assert result.val_loss_after < result.val_loss_before - 0.1, (task, result.history)


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("run, tensors", [("default", 17), ("checkpointing_packed", 17), ("together", 33)])
def test_two_processes_train_the_adapter_a_single_process_would(ddp_runs, run, tensors):
    from safetensors.torch import load_file

    rank0, rank1 = (load_file(ddp_runs / "ddp" / run / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(ddp_runs / "single" / run / "rank0.safetensors")
    assert rank0.keys() == single.keys() and len(rank0) == tensors  # adapter tensors, their gradients, a loss
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # the processes agree bit for bit
        error = (rank0[name] - single[name]).norm()  # = one process, same batch (up to summation order)
        assert error <= 1e-5 * single[name].norm() + 1e-12, (name, error)
    lora_b = [n for n in rank0 if "lora_B" in n and not n.startswith("grad.")]
    assert all(rank0[n].abs().max() > 1e-3 for n in lora_b)  # every adapter trained


# ---------------------------------------------------------------------------------------------- a step
def _first_gradients(**kw):
    model = lora_gpt2()
    with torch.no_grad():  # a non-zero B, so that every LoRA factor has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(model, config(steps=1, **kw), windows(DOMAIN, 100, 0), windows(DOMAIN, 4, 1), log=quiet)
    return first_step_gradients(trainer)


def test_gradient_accumulation_gives_the_whole_batch_gradient():
    whole = _first_gradients(batch_size=4, max_grad_norm=0)
    accumulated = _first_gradients(batch_size=2, grad_accum=2, max_grad_norm=0)
    assert len(whole) == 8
    for name in whole:
        assert torch.allclose(whole[name], accumulated[name], rtol=1e-5, atol=1e-8), name


def test_bf16_autocast_trains_on_the_cpu():
    trainer = Trainer(gpt2(), config(steps=10, precision="bf16", eval_every=5), windows(DOMAIN, 100, 0),
                      windows(DOMAIN, 8, 1), log=quiet)
    with trainer._autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    result = trainer.train()
    assert result.val_loss_after < result.val_loss_before - 0.1
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose from auto, bf16, fp32"):
        config(precision="fp8").check()


def test_resuming_drops_metrics_past_the_checkpoint_and_a_line_cut_short(tmp_path):
    from minilora.train.checkpoint import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4}\n{"step": 5}\n{"step": 6}\n{"st')  # a crash in the middle of a write
    truncate_metrics(path, 5)
    assert path.read_text() == '{"step": 4}\n{"step": 5}\n'


def test_a_start_token_begins_causal_texts_when_the_tokenizer_has_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from minilora.train.data import Tokens

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, "Instruction": 4, "Output": 5, ":": 6, "hi": 7, "yo": 8}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    llama_like = Tokens(PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>"))
    assert llama_like.bos_id == 0 and load_tokenizer(None, "bytes").bos_id is None
    (tmp_path / "t.jsonl").write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    row = load_examples(tmp_path / "t.jsonl", "instruction", llama_like, 12)
    assert row.tensors["input_ids"][0, 0] == 0 and row.tensors["labels"][0, 0] == IGNORE
    assert text_windows("hi yo hi yo", llama_like, 3).tensors["input_ids"][0].tolist()[0] == 0
