r"""# Exercise 10: measuring forgetting on a retain set

*Chapter 9 of the tutorial (`docs/tutorial.md`, "Catastrophic forgetting").*

Fine-tuning on a domain pulls a model away from what it knew. To see how far, keep a *retain set*:
held-out text of the old kind, never trained on. A language model's loss on a sequence
$t_1 \dots t_T$ is the mean next-token cross-entropy

$$ \mathcal{L} = -\frac{1}{N} \sum_{b} \sum_{j=1}^{T-1} \log p_\theta(t_{b,j+1} \mid t_{b,1..j}), $$

over all $N = B\,(T-1)$ predicted positions of a batch, in nats per token. Then

$$ \text{forgetting} = \mathcal{L}_{\text{retain}}(\text{after}) - \mathcal{L}_{\text{retain}}(\text{before}), $$

and $e^{\text{forgetting}}$ is the factor by which the retain perplexity grew.

**A budget.** minilora's trainer evaluates every few steps and its *forgetting monitor*
(`minilora.train.monitor.Monitor`) applies two rules at each evaluation $(t, \text{val}_t, \text{retain}_t)$,
the first evaluation (step 0, before training) setting $\text{retain}_0$:

1. if $\text{retain}_t - \text{retain}_0 > \text{budget}$: stop; this step is not kept;
2. otherwise, if $\text{val}_t$ is below the best validation loss so far, $t$ is the new best.

The adapter kept is the best one within budget; step 0 counts, so a run that only forgets keeps
the original model.

## Your task

1. `mean_token_loss(model, input_ids)`: $\mathcal{L}$ above for a causal LM (`model(input_ids).logits`
   is (B, T, V)), as a float, without building a graph.
2. `train_and_measure(model, domain_ids, retain_ids, steps, lr)`: measure both losses, train the
   model's trainable parameters for `steps` full-batch steps of `torch.optim.AdamW(lr=lr)` on the
   domain loss, measure again. Return a dict with `domain_before`, `domain_after`,
   `retain_before`, `retain_after`, `forgetting`.
3. `monitor_decision(history, budget)`: for evaluations `[(step, val_loss, retain_loss), ...]`,
   return `(best_step, stop_step)`, `stop_step` the step the budget stopped training at, or `None`.

The tests compare your loss with the one transformers computes, train a tiny GPT-2 with LoRA on one
half of the vocabulary and watch the other half's loss rise, and compare your decisions with
minilora's `Monitor`.

Run: `pytest docs/exercises/test_ex10_forgetting.py`
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def mean_token_loss(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every predicted position, in nats."""
    with torch.no_grad():
        return _loss(model, input_ids).item()


def train_and_measure(model: nn.Module, domain_ids: torch.Tensor, retain_ids: torch.Tensor, steps: int,
                      lr: float) -> dict[str, float]:
    """Domain and retain losses before and after `steps` AdamW steps on the domain text."""
    out = {"domain_before": mean_token_loss(model, domain_ids), "retain_before": mean_token_loss(model, retain_ids)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, domain_ids).backward()
        optimizer.step()
    out["domain_after"] = mean_token_loss(model, domain_ids)
    out["retain_after"] = mean_token_loss(model, retain_ids)
    out["forgetting"] = out["retain_after"] - out["retain_before"]
    return out


def monitor_decision(history: list[tuple[int, float, float]], budget: float) -> tuple[int, int | None]:
    """(best step within budget, step the budget stopped at or None)."""
    retain_0 = history[0][2]
    best_step, best_loss = history[0][0], float("inf")
    for step, val_loss, retain_loss in history:
        if retain_loss - retain_0 > budget:
            return best_step, step
        if val_loss < best_loss:
            best_step, best_loss = step, val_loss
    return best_step, None
