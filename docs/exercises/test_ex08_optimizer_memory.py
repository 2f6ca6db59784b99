"""Exercise 8: AdamW's state by hand, against torch.optim.AdamW and minilora.optim.PagedAdamW."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minilora import LoraConfig, get_peft_model
from minilora.optim import PagedAdamW

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def lora_gpt2():
    return get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "c_fc"]))


def moments_after_one_step(model, optimizer):
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for name, t in state.items() if name in ("exp_avg", "exp_avg_sq"))


def test_full_fine_tuning_state_is_torch_s(ex):
    """Every weight trains: the moments AdamW holds after a step are your count, twice the weights."""
    model = tiny_gpt2()
    measured = moments_after_one_step(model, torch.optim.AdamW(model.parameters()))
    assert ex.adamw_state_bytes(model) == measured == 2 * 4 * sum(p.numel() for p in model.parameters())


def test_lora_state_is_torch_s_and_small(ex):
    """LoRA: only A and B have state; AdamW given all parameters still holds moments for those only."""
    model = lora_gpt2()
    measured = moments_after_one_step(model, torch.optim.AdamW(model.parameters()))
    trainable, total = model.get_nb_trainable_parameters()
    assert ex.adamw_state_bytes(model) == measured == 8 * trainable
    assert ex.adamw_state_bytes(model) < 8 * total / 10


def test_half_precision_moments_are_half_the_bytes(ex):
    """Moments take the parameter's dtype: a bf16 model's state is 2 · 2 bytes per weight (torch's AdamW)."""
    model = tiny_gpt2().to(torch.bfloat16)
    assert ex.adamw_state_bytes(model) == moments_after_one_step(model, torch.optim.AdamW(model.parameters())) \
        == 4 * sum(p.numel() for p in model.parameters())


def test_paged_adamw_state_and_peak(ex):
    """PagedAdamW: state_bytes() is your total, and its peak on the device is your largest page, for
    pages smaller and larger than the whole state."""
    for page_bytes in (1024, 4096, 10_000, 1 << 20):
        model = lora_gpt2()
        opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], page_bytes=page_bytes)
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        assert opt.state_bytes() == ex.adamw_state_bytes(model)
        assert opt.peak_device_state_bytes == ex.paged_peak_bytes(model, page_bytes), page_bytes
        assert ex.paged_peak_bytes(model, page_bytes) <= max(page_bytes, 8)
