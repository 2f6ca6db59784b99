r"""# Exercise 8: the optimizer's memory

*Chapter 7 of the tutorial (`docs/tutorial.md`, "The optimizer's memory, and what paging moves").*

AdamW keeps two moments per trainable parameter, $m$ (the running mean of gradients) and $v$ (of
squared gradients), each the parameter's shape and dtype (`exp_avg`, `exp_avg_sq` in
`torch.optim.AdamW`'s state), plus a scalar step count. For fp32 parameters that is

$$ \text{state bytes} = 2 \times 4 \times (\text{trainable parameters}), $$

twice the weights themselves. Full fine-tuning pays it for every weight; LoRA only for $A$ and $B$.
Frozen parameters (no gradient) get no state at all.

**Paging.** `minilora.optim.PagedAdamW` keeps $m$ and $v$ on the CPU and walks the parameters in
*pages* of at most `page_bytes` of state, bringing one page at a time to the accelerator. A page
is a run of consecutive elements of the flattened parameters (a large parameter spans several
pages, a page may hold several small ones); it holds
$\lfloor \text{page\_bytes} / (2 \cdot \text{element size}) \rfloor$ elements (two moments each),
except the last, which holds what is left. On the CPU, with one page resident at a time, the most
state bytes ever on the "device" is the largest page's.

## Your task

1. `adamw_state_bytes(model)`: the bytes of AdamW's moments ($m$ and $v$) for `model`'s trainable
   parameters (use each parameter's `element_size()`).
2. `paged_peak_bytes(model, page_bytes)`: the largest page's state bytes, for fp32 parameters.

The tests compare with `torch.optim.AdamW`'s state after one step (full fine-tuning and LoRA) and
with `PagedAdamW`'s `state_bytes()` and `peak_device_state_bytes`.

Run: `pytest docs/exercises/test_ex08_optimizer_memory.py`
"""

import torch.nn as nn


def adamw_state_bytes(model: nn.Module) -> int:
    """Bytes of exp_avg and exp_avg_sq over the trainable parameters."""
    raise NotImplementedError("two moments of p.numel() * p.element_size() bytes for each p with requires_grad")


def paged_peak_bytes(model: nn.Module, page_bytes: int) -> int:
    """State bytes of the largest page PagedAdamW makes of `model`'s trainable fp32 parameters."""
    raise NotImplementedError("elements per page = page_bytes // 8; the largest page holds that many, or all if fewer")
