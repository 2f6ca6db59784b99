r"""A causal LM's cross-entropy that never holds the logits of all tokens at once.

The plain loss builds logits Z = H Wᵀ + b for all N scored tokens, an (N, V) tensor (V: the
vocabulary, 128,256 for LLaMA 3), casts it to fp32 and keeps it, with its gradient, for the
backward pass: the largest tensor of a fine-tuning step. Here the head and the loss run over
chunks of C tokens; one chunk's logits (C, V) exist at a time, in fp32:

    loss = Σ_i [ logsumexp_v z_iv − z_{i,y_i} ],   z_i = W h_i + b   (scored tokens i only)

The gradient of a token's loss in its logits is softmax(z_i) − e_{y_i} =: g_i, so

    ∂loss/∂h_i = g_i W                 (C, V) @ (V, H)
    ∂loss/∂W   = Σ_i g_iᵀ h_i          (V, C) @ (C, H), only when the head trains
    ∂loss/∂b   = Σ_i g_i

The loss is a sum, so the gradient that reaches it from above is one number: the gradients are
computed in the forward pass, chunk by chunk, and the backward pass only scales them (no second
pass over the head). Memory: one chunk of logits and its softmax, plus ∂loss/∂H (N, H), the size
of the hidden states themselves.

Where the hidden states come from: the summed loss of training and evaluation is computed by the
head itself, inside the model's forward (`causal_lm_summed_loss`), so that it runs where FSDP
shards the head too; the preference log-probs and `use_chunked_loss` read them at the output of the
backbone (`base_model`) in a forward with `logits_to_keep=1` (the head then runs on one position
per row; `causal_lm_hidden`). LoRA layers, trained copies and routing act as in any forward. A model whose head does more than `W h + b` (Gemma's soft-capping, a logit
scale), a LoRA adapter on the head, a 4-bit head or a forward without `logits_to_keep` keeps the
plain loss, for the reason `unavailable` gives.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .data import IGNORE, model_inputs

CHUNK_ELEMENTS = 1 << 25  # logits per chunk (C · V): 128 MiB in fp32
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_tokens(vocab: int) -> int:
    """C: how many tokens' logits fit in CHUNK_ELEMENTS (at least 1)."""
    return max(1, CHUNK_ELEMENTS // vocab)


class SummedLinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(W h_i + b, y_i) in fp32 over hidden (N, H), labels (N,) all scored; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]  # (C, H), (C,)
            z = _logits(h, weight, bias)  # (C, V): the head in the compute dtype, the loss in fp32
            lse = torch.logsumexp(z, dim=-1)  # (C,)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if want_h or want_w or want_b:
                g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(y), device=g.device), y] -= 1.0  # g = softmax − onehot
                if want_h:
                    grad_h[start:start + chunk] = g.to(weight.dtype) @ weight  # (C, V) @ (V, H)
                if want_w:
                    grad_w += g.t() @ h.float()  # (V, C) @ (C, H)
                if want_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.have = (want_h, want_w, want_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total.to(dtype) if have else None for have, dtype in zip(ctx.have, ctx.dtypes)]
        return (*grads, None, None)


def summed_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                labels: torch.Tensor) -> torch.Tensor:
    """Σ CE over the labels that are not -100: hidden (…, H), labels (…); fp32 scalar."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    scored = labels != IGNORE
    return SummedLinearCrossEntropy.apply(hidden[scored], weight, bias, labels[scored], chunk_tokens(weight.shape[0]))


class TokenLogProbs(torch.autograd.Function):
    r"""log p(y_i | h_i) = z_{i,y_i} − logsumexp_v z_iv for hidden (N, H), labels (N,): (N,) in fp32.

    Each token's log-prob reaches the loss with its own weight (a DPO loss weighs each answer's
    tokens by that pair's sigmoid), unknown in the forward pass: the backward pass computes the
    logits again, chunk by chunk, with ∂ log p_i/∂z_i = e_{y_i} − softmax(z_i) scaled by the
    incoming gradient of token i."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            z = _logits(hidden[start:start + chunk], weight, bias)
            y = labels[start:start + chunk]
            out[start:start + chunk] = z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, labels = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[start:start + ctx.chunk], labels[start:start + ctx.chunk]
            z = _logits(h, weight, bias)  # (C, V); then ∂ log p/∂z = onehot − softmax, in its place
            g = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_().neg_()
            g[torch.arange(len(y), device=g.device), y] += 1.0
            g *= grad_out[start:start + ctx.chunk, None].float()
            if want_h:
                grad_h[start:start + ctx.chunk] = g.to(weight.dtype) @ weight
            if want_w:
                grad_w += g.t() @ h.float()
            if want_b:
                grad_b += g.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if want_w else None,
                grad_b.to(bias.dtype) if want_b else None, None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One chunk's logits (C, V): the head in the compute dtype, fp32 after."""
    z = (h @ weight.t()).float()
    return z + bias.float() if bias is not None else z


def token_logps(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """log p(y_i) of each token (N,) in fp32 (labels all scored), without the (N, V) logits."""
    return TokenLogProbs.apply(hidden, head.weight, head.bias, labels, chunk_tokens(head.weight.shape[0]))


@torch.no_grad()
def kl_sum(hidden: torch.Tensor, head: nn.Linear, ref_hidden: torch.Tensor, ref_head: nn.Linear) -> torch.Tensor:
    """Σ_i KL(p_i ‖ q_i) = Σ_i Σ_v p_iv (log p_iv − log q_iv), p from (hidden, head), q from the
    reference's; chunk by chunk, fp32."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    chunk = chunk_tokens(head.weight.shape[0])
    for start in range(0, hidden.shape[0], chunk):
        log_p = _logits(hidden[start:start + chunk], head.weight, head.bias).log_softmax(-1)
        log_q = _logits(ref_hidden[start:start + chunk], ref_head.weight, ref_head.bias).log_softmax(-1)
        total += (log_p.exp() * (log_p - log_q)).sum()
    return total


# ---------------------------------------------------------------------------------------------- the model
def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a LoraModel (or the model itself)."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def unsharded_class(module: nn.Module) -> type:
    """The module's class, or the class FSDP2's `fully_shard` derived FSDP<Class> from."""
    if isinstance(module, FSDPModule):
        return type(module).__bases__[-1]
    return type(module)


def unavailable(model: nn.Module) -> Optional[str]:
    """Why the chunked loss cannot run on this model (None: it can)."""
    hf = transformers_model(model)
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if head is None:
        return f"{type(hf).__name__} has no LM head (get_output_embeddings)"
    if hasattr(head, "base_layer"):
        return "the LM head carries an adapter (LoRA or trainable tokens): its logits are not W h + b"
    head = getattr(head, "active_module", head)  # a head trained in full: the copy in use
    if unsharded_class(head) is not nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear (a 4-bit head, for one)"
    if getattr(hf, "base_model", hf) is hf:
        return f"{type(hf).__name__} has no backbone (base_model) whose output the head reads"
    if "logits_to_keep" not in inspect.signature(hf.forward).parameters:
        return f"{type(hf).__name__}.forward takes no logits_to_keep, so it would build every logit anyway"
    config = getattr(hf, "config", None)
    extras = [name for name in HEAD_EXTRAS if getattr(config, name, None) not in (None, 1, 1.0)]
    if extras:
        return f"the model's head does more than W h + b ({extras[0]})"
    return None


def active_head(model: nn.Module) -> nn.Linear:
    """The LM head in use (a head trained in full: its trained copy)."""
    head = transformers_model(model).get_output_embeddings()
    return getattr(head, "active_module", head)


def sharded(head: nn.Linear) -> bool:
    """Whether FSDP holds the head's weight as a shard here (whole only inside the head's own forward)."""
    return type(head.weight.data).__name__ == "DTensor"


def causal_lm_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Linear]:
    """(the final hidden states (B, T, H) that the head reads, the head in use) from one forward of
    `model` whose head runs on one position per row. Not under FSDP: the head's weight is read after
    the forward, where FSDP has sharded it again."""
    hf = transformers_model(model)
    if sharded(active_head(model)):
        raise ValueError("the LM head is sharded (FSDP): its weight is whole only inside its own forward, and "
                         "these log-probs read it after the forward; train with --parallel ddp")
    captured = []
    hook = hf.base_model.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1], active_head(model)


def causal_lm_summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ of the per-token cross-entropies of one micro-batch (position t predicts t + 1), fp32, with
    no (N, V) logits (see the module docstring); the caller checks `unavailable` first.

    The head computes it: for one forward of the model, the head's forward is this loss over the
    hidden states it receives (B, T, H), returned as a (1, 1, 1) "logits" tensor. The model's own
    forward runs unchanged around it, so FSDP gathers the head's weight for that call as it would
    for the logits (and again for the backward pass) and the gradients reach the head's shard."""
    head = active_head(model)
    labels = batch["labels"][:, 1:]  # (B, T−1): position t predicts t + 1

    def loss_as_logits(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (1, 1, 1)
        return summed_linear_cross_entropy(hidden[:, :-1], head.weight, head.bias, labels).view(1, 1, 1)

    head.forward = loss_as_logits  # an instance attribute: nn.Module's __call__ (and its hooks) call it
    try:
        out = model(**model_inputs(batch))  # every position reaches the head
    finally:
        del head.forward
    return out.logits.reshape(())


def use_chunked_loss(model: nn.Module) -> nn.Module:
    """Make `model(..., labels=...)` compute its loss chunked, for training loops that read
    `outputs.loss` (transformers' Trainer, TRL's): the transformers model's forward is wrapped, in
    place, so that with `labels` its head runs on the last position only (`outputs.logits` is
    (B, 1, V)) and `outputs.loss` is the mean cross-entropy over the shifted labels (divided by
    `num_items_in_batch` when the Trainer passes it). Without labels the forward is the model's own.
    Refused, with the reason, for a model whose logits are not W h + b (see `unavailable`)."""
    reason = unavailable(model)
    if reason is not None:
        raise ValueError(f"use_chunked_loss: {reason}; keep the model's own loss")
    hf = transformers_model(model)
    original = hf.forward

    def forward(*args, labels: Optional[torch.Tensor] = None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        captured = []
        hook = hf.base_model.register_forward_hook(lambda module, inputs, out: captured.append(out[0]))
        try:
            out = original(*args, **{**kwargs, "logits_to_keep": 1})
        finally:
            hook.remove()
        head = active_head(model)
        labels = labels[:, 1:].to(captured[-1].device)
        total = summed_linear_cross_entropy(captured[-1][:, :-1], head.weight, head.bias, labels)
        count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
        out.loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        return out

    forward.__signature__ = inspect.signature(original)  # what the Trainer reads: the model's own inputs
    hf.forward = forward
    return model
