"""Tiny models of each family, built from configs (no downloads), and shared helpers."""

import copy
import os
import signal
import warnings

import torch

# The Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present. The
# switch is read when a kernel is defined, so it is set before anything imports minilora.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*shares its weight with the input embeddings.*")

VOCAB = 128


def tiny_gpt2(n_layer=4, n_embd=32):
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(n_layer=4):
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(n_layer=4):
    cfg = BertConfig(num_hidden_layers=n_layer, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(n_layer=2):
    cfg = T5Config(num_layers=n_layer, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=VOCAB,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(n_layer=2):
    cfg = BartConfig(encoder_layers=n_layer, decoder_layers=n_layer, d_model=32, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=VOCAB,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(cfg).eval()


FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "t5": tiny_t5, "bart": tiny_bart}


def make(family, seed=0, **kw):
    torch.manual_seed(seed)
    return FACTORIES[family](**kw)


def batch(family, seed=1, batch_size=2, length=9):
    """Model inputs for one family: decoder inputs for encoder-decoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in ("t5", "bart"):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch_size, 5), generator=g)
    return out


def linear(d_in, d_out, conv1d=False, seed=0):
    """An nn.Linear, or a GPT-2 Conv1D (weight stored (in, out)) with normal weights and bias."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    if conv1d:
        layer = Conv1D(d_out, d_in)
        torch.nn.init.normal_(layer.weight, std=0.05)
        torch.nn.init.normal_(layer.bias, std=0.05)
        return layer
    return torch.nn.Linear(d_in, d_out)


def train_losses(model, steps=30, lr=1e-2, seed=0):
    """Train the trainable parameters of a tiny causal LM to memorize one batch; the losses."""
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def clone():
    return copy.deepcopy


def interrupt_after(trainer, step: int) -> None:
    """Make `trainer` receive SIGINT (what Ctrl-C sends) right after its optimizer step `step`."""
    train_step = trainer._train_step

    def step_then_interrupt():
        out = train_step()
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer._train_step = step_then_interrupt


def first_step_gradients(trainer) -> dict:
    """Train, and return the gradients {name: tensor} that the optimizer's first step received."""
    grads = {}
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.named} if not grads else {})
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    trainer.train()
    return grads


def gpt2_model_dir(path):
    """A tiny GPT-2 language model saved as a Hugging Face directory (vocabulary 256: byte tokens)."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def instruction_files(folder):
    """An instruction data set (train.jsonl) and general text (general.txt) for `minilora finetune`."""
    import json

    from minilora.experiments.corpus import GENERAL, generate

    words = ["cat", "dog", "owl", "fox", "hen"]
    rows = [{"instruction": "Shout the word", "input": w, "output": w.upper() + "!"} for w in words * 8]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "general.txt").write_text(generate(GENERAL, 40, 0))
    return folder / "train.jsonl", folder / "general.txt"


def gpt2_of_vocab(vocab: int, positions: int = 64):
    """A 2-layer GPT-2 (learned absolute positions, tied head) without dropout, seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=positions,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def llama_of_vocab(vocab: int):
    """A 2-layer LLaMA (rotary positions, grouped KV heads), seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory):
    """tests/ddp_worker.py's runs under torchrun (2 processes) and in one process: their folders (one
    launch for the trainer's, the together trainer's and DPO's data-parallel tests)."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "ddp_worker.py"
    root = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    (root / "ddp").mkdir()
    (root / "single").mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(root / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, str(worker), str(root / "single")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root
