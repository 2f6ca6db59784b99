r"""Expert LoRA at the cost of the routed tokens: the low-rank terms on the tokens each expert receives.

A LoRA on expert e's weight changes what e computes for the tokens routed to it:

    y_t = W_e x_t + b_e + s · B_e (A_e x_t)          for each token t routed to e

so no ΔW_e = s·B_e·A_e, (E, d_out, d_in), is ever formed: each token pays r·(d_in + d_part)
multiply-adds per adapted part, and an expert that no token reaches costs nothing and gets zero
gradient. The expert MLP is written once for every layout transformers' experts interface
describes (`use_experts_implementation`: the flags is_transposed, has_gate, has_bias,
has_post_expert_norm, and the module's own `_apply_gate`, which knows Mixtral's [gate | up] halves
and GPT-OSS's interleaved, clamped gate):

    tokens sorted by expert   x_g (S, d), S = tokens · top-k; offsets: where each expert's run ends
    h = gate(W_gu x + b + Σ_parts s·B(A x))         (S, 2·d_ff)  -> (S, d_ff)
    y = W_d h + b + Σ_parts s·B(A h)                (S, d)
    out_t = Σ_k w_tk · y_(t, k)                     (T, d), the routing weights

Each product is one grouped matmul over the sorted tokens (transformers' `_grouped_linear`:
`torch.nn.functional.grouped_mm` where the device and strides allow, else its own operator, opaque
to torch.compile), so the number of launches does not grow with the number of experts, and the
whole forward traces as one graph. Routing (which experts, with what weights) is the model's own.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers' grouped matmul over experts' runs of tokens (grouped_mm, or its own operator)
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # a transformers without the experts interface: every experts module takes the dense route
    _grouped_linear = None

ROUTING = ("hidden_states", "top_k_index", "top_k_weights")  # the experts interface's forward arguments


def understands(experts: nn.Module) -> bool:
    """Whether `experts` is a transformers experts-interface module whose layout this file computes."""
    return (all(hasattr(experts, flag) for flag in ("is_transposed", "has_gate", "has_bias", "num_experts"))
            and hasattr(type(experts), "_apply_gate") and not getattr(experts, "_is_expert_parallel", False)
            and _grouped_linear is not None)


def routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states (T, d), top_k_index (T, k), top_k_weights (T, k)) however they were passed."""
    values = dict(zip(ROUTING, args), **kwargs)
    return tuple(values[name] for name in ROUTING)


def experts_forward(layer, names: list[str], hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output (T, d) with adapters `names` of LoraExperts `layer` active; see the module docstring."""
    experts = layer.base_layer
    k = top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))  # (S,): each expert's tokens together
    tokens = order // k  # (S,): the token of each sorted row
    counts = torch.histc(expert_ids.float(), bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,): the end of each expert's run
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    h = adapted_linear(layer, names, first, hidden_states[tokens], expert_ids, offsets)  # (S, 2·d_ff)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)  # (S, d_ff)
    y = adapted_linear(layer, names, "down_proj", h, expert_ids, offsets)  # (S, d)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    return out.index_add_(0, tokens, y.float()).to(hidden_states.dtype)  # (T, d): Σ over each token's k experts


def adapted_linear(layer, names: list[str], parameter: str, x: torch.Tensor, expert_ids: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """W_e x + b_e + Σ s·B_e(A_e x) for the sorted rows x (S, d_in), e each row's expert: (S, d_out)."""
    experts = layer.base_layer
    weight = getattr(experts, parameter)  # stored (E, d_out, d_in), or (E, d_in, d_out) transposed
    bias = getattr(experts, f"{parameter}_bias")[expert_ids] if experts.has_bias else None
    y = _grouped_linear(x, weight, offsets, bias=bias, is_transposed=layer.transposed)
    for name in names:
        for part_name, part in layer.parts[name].get(parameter, {}).items():
            A, B = layer.lora_A[name][parameter][part_name], layer.lora_B[name][parameter][part_name]
            A, B = aligned_rank(A, B)
            low = _grouped_linear(_grouped_linear(x.to(A.dtype), A, offsets), B, offsets)  # (S, r) -> (S, d_part)
            rows = part.rows(y, -1)  # (S, blocks, d_part / blocks), a view of y
            rows += (layer.scaling[name][parameter][part_name] * low).to(y.dtype).view(rows.shape)
    return y


def aligned_rank(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E, r, d_in) and B (E, d_part, r) with r padded by zeros to a multiple of 16 bytes: the grouped
    matmul's kernel needs every stride a multiple of 16 bytes. The padding adds nothing to B·A."""
    step = max(1, 16 // A.element_size())
    pad = -A.shape[1] % step
    if pad == 0:
        return A, B
    return torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))
