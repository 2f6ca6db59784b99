"""warmup_cosine: linear warmup, cosine decay to a floor, as a LambdaLR."""

import math

import pytest
import torch

from minilora.train import warmup_cosine


def lrs(warmup, total, floor, steps=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, warmup, total, floor)
    out = []
    for _ in range(steps or total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_shape_of_the_schedule():
    lr = lrs(warmup=4, total=20, floor=0.1)
    assert lr[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # never zero: the first step moves
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))  # decays monotonically after warmup
    assert lr[4 + 8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr[20] == pytest.approx(0.2)  # the floor: min_lr_ratio × base
    assert lrs(2, 5, 0.0, steps=9)[-1] == pytest.approx(0.0)  # stays at the floor past total_steps


@pytest.mark.parametrize("args", [(5, 3, 0.0), (0, 0, 0.0), (1, 10, 1.5)])
def test_bad_arguments(args):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):
        warmup_cosine(opt, *args)
