"""PagedAdamW: AdamW's trajectory exactly, torch-compatible state, and a budget that holds."""

import copy

import pytest
import torch
import torch.nn as nn

from conftest import make
from minilora import LoraConfig, get_peft_model
from minilora.optim import PagedAdamW
from minilora.train import warmup_cosine


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))


def train(model, opt, steps, seed=1, sched=None, clip=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched:
            sched.step()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("update_on", ["device", "offload"])
def test_same_trajectory_as_torch_adamw(amsgrad, update_on):
    ref, ours = net(), net()
    hp = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05, amsgrad=amsgrad)
    torch_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **hp)
    paged = PagedAdamW(ours.parameters(), page_bytes=4096, update_on=update_on, **hp)  # many pages, split params
    train(ref, torch_opt, 300)
    train(ours, paged, 300)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch_opt.state.values(), paged.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], atol=1e-9, rtol=1e-5)


def test_lora_parameters_of_a_tiny_gpt2_schedulers_and_clipping():
    models = [get_peft_model(make("gpt2"), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
              for _ in range(2)]
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    opts = [torch.optim.AdamW([p for p in models[0].parameters() if p.requires_grad], lr=1e-2, foreach=False),
            PagedAdamW([p for p in models[1].parameters() if p.requires_grad], lr=1e-2, page_bytes=2048)]
    scheds = [warmup_cosine(o, 5, 40, 0.1) for o in opts]
    for _ in range(40):
        for model, opt, sched in zip(models, opts, scheds):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
            opt.step()
            sched.step()
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_budget_is_respected_and_accounted():
    model = net()
    opt = PagedAdamW(model.parameters(), page_bytes=1024, device_budget_bytes=1024)
    train(model, opt, 2)
    total = opt.state_bytes()
    assert total == 2 * 4 * sum(p.numel() for p in model.parameters())
    assert opt.peak_device_state_bytes == 1024 < total  # one full page at a time, never more
    assert opt.device_state_bytes == 0  # nothing stays resident between steps
    offload = PagedAdamW(net().parameters(), page_bytes=1024, update_on="offload")
    train(net(), offload, 1)
    assert offload.peak_device_state_bytes == 0  # state never visits the device


def test_state_dict_moves_between_torch_adamw_and_paged_and_resume_is_exact():
    ref, ours = net(), net()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    train(ref, torch_opt, 20)
    ours.load_state_dict(ref.state_dict())
    paged = PagedAdamW(ours.parameters(), lr=1e-2, page_bytes=2048)
    paged.load_state_dict(torch_opt.state_dict())  # from torch's AdamW
    train(ref, torch_opt, 20, seed=5)
    train(ours, paged, 20, seed=5)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    # and back: a PagedAdamW checkpoint resumes exactly, in PagedAdamW and in torch's AdamW
    snapshot, weights = copy.deepcopy(paged.state_dict()), copy.deepcopy(ours.state_dict())
    train(ours, paged, 10, seed=9)
    for opt_cls in (PagedAdamW, torch.optim.AdamW):
        resumed = net()
        resumed.load_state_dict(weights)
        opt = opt_cls(resumed.parameters(), lr=1e-2)
        opt.load_state_dict(snapshot)
        train(resumed, opt, 10, seed=9)
        for a, b in zip(resumed.parameters(), ours.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- bad input, clear errors
@pytest.mark.parametrize("kw, message", [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ({"eps": -1e-8}, "Invalid epsilon value"),
    ({"weight_decay": -1}, "Invalid weight_decay value"),
    ({"page_bytes": 4096, "device_budget_bytes": 1000}, "smaller than one page.*minimum budget is 4096 bytes"),
    ({"update_on": "gpu"}, "update_on must be"),
])
def test_bad_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        PagedAdamW(net().parameters(), **kw)


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = PagedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_state_dict_from_another_layout():
    big, small = net(), nn.Linear(16, 4)
    opt = PagedAdamW(big.parameters())
    train(big, opt, 1)
    with pytest.raises(ValueError, match="saved for a different set of parameters"):
        PagedAdamW(small.parameters()).load_state_dict(opt.state_dict())
    other = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match=r"parameter 0 has exp_avg of shape \(64, 16\) but the parameter has shape "
                                         r"\(32, 16\)"):
        PagedAdamW(other.parameters()).load_state_dict(opt.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: pinned memory and stream overlap")
def test_cuda_pinned_state_and_prefetch_within_budget():
    torch.manual_seed(0)
    ref = nn.Linear(512, 512).cuda()
    ours = copy.deepcopy(ref)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=False)
    paged = PagedAdamW(ours.parameters(), lr=1e-3, page_bytes=256 << 10, device_budget_bytes=512 << 10)
    for _ in range(20):
        for model, opt in ((ref, torch_opt), (ours, paged)):
            x = torch.randn(64, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(_))
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    state = paged.state[ours.weight]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].is_pinned()
    assert paged.peak_device_state_bytes == 512 << 10  # two pages in flight: prefetch overlapped
