"""Exercise 11: DPO's loss by hand, against worked numbers, minilora's loss and TRL's DPOTrainer."""

import copy
import math
import tempfile

import torch

from minilora.train.loss import dpo_loss as minilora_dpo_loss  # minilora's internal loss module (no public name)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_worked_numbers(ex):
    """log π(y_w) = −5, log π(y_l) = −7, references −6 and −6, β = 0.1: h = 0.2, ℓ = log(1 + e^−0.2);
    a policy equal to its reference gives log 2 for every pair, whatever β (float64: to 1e-12)."""
    loss = ex.dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.0), beta=0.1)
    assert abs(loss.item() - math.log(1 + math.exp(-0.2))) < 1e-12
    same = ex.dpo_loss(t(-3.0, -9.0), t(-4.0, -1.0), t(-3.0, -9.0), t(-4.0, -1.0), beta=5.0)
    assert same.shape == (2,) and torch.allclose(same, torch.full((2,), math.log(2), dtype=torch.float64), atol=1e-12)


def test_the_loss_is_minilora_s(ex):
    """On random log-probabilities, per pair, equal to minilora's dpo_loss (float64: to 1e-12), and
    stable where h is large (no inf or nan at |h| = 1000)."""
    g = torch.Generator().manual_seed(0)
    logps = [-20 * torch.rand(16, dtype=torch.float64, generator=g) for _ in range(4)]
    for beta in (0.1, 0.5, 2.0):
        torch.testing.assert_close(ex.dpo_loss(*logps, beta=beta), minilora_dpo_loss(*logps, beta=beta),
                                   atol=1e-12, rtol=1e-12)
    extreme = ex.dpo_loss(t(0.0, 0.0), t(0.0, 0.0), t(-1000.0, 1000.0), t(0.0, 0.0), beta=1.0)
    assert torch.isfinite(extreme).all() and extreme[0].item() < 1e-300 and abs(extreme[1].item() - 1000.0) < 1e-9


def test_completion_logps_counts_the_answer_only(ex):
    """Two rows of six tokens with known logits: the sum runs over the answer's tokens only (each
    predicted by the position before it), not the prompt or the padding (fp32: to 1e-6)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 10, generator=g)
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 7, 8, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0]])
    logp = torch.log_softmax(logits, dim=-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5], logp[1, 2, 8]])
    got = ex.completion_logps(logits, ids, mask)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "cat dog owl fox big small red blue is a the tell me about yes no".split()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_the_loss_of_a_batch_is_trl_s(ex):
    """TRL's DPOTrainer (sigmoid loss, β = 0.3) on a tiny Llama and a perturbed copy as the reference:
    its compute_loss on a batch of 3 pairs equals the mean of your dpo_loss over your completion_logps
    of both models' logits on that batch (fp32 sums of ~10 log-probs: to 1e-5)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = word_tokenizer()
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [{"prompt": "tell me about cat", "chosen": " cat is big", "rejected": " no"},
            {"prompt": "tell me about the red dog", "chosen": " yes", "rejected": " the dog is small and blue"},
            {"prompt": "owl", "chosen": " a fox", "rejected": " a red owl is a bird"}]
    with tempfile.TemporaryDirectory() as folder:
        args = DPOConfig(output_dir=folder, beta=0.3, loss_type=["sigmoid"], report_to="none", use_cpu=True,
                         per_device_train_batch_size=3, max_length=None, bf16=False)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        policy.eval()
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mine = ex.completion_logps(policy(**inputs).logits, batch["input_ids"], batch["completion_mask"])
        ref = ex.completion_logps(reference(**inputs).logits, batch["input_ids"], batch["completion_mask"])
    P = len(rows)
    loss = ex.dpo_loss(mine[:P], mine[P:], ref[:P], ref[P:], beta=0.3).mean().item()
    assert abs(trl_loss - math.log(2)) > 1e-2  # the policy differs from its reference
    assert abs(loss - trl_loss) < 1e-5
