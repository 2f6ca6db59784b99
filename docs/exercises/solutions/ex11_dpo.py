r"""# Exercise 11: DPO's loss by hand

*Preference tuning with DPO (`docs/preference-tuning.md`; `minilora finetune --task preference`).*

Direct Preference Optimization (Rafailov et al., 2023) trains a policy $\pi_\theta$ on pairs: a
prompt $x$, a preferred answer $y_w$ ("chosen") and a worse one $y_l$ ("rejected"), against a
frozen reference $\pi_{\text{ref}}$ (the model before this training; for a LoRA, the model with its
adapter switched off).

**Sequence log-probabilities.** A causal LM reads the whole sequence prompt + answer; position $t$
predicts token $t+1$. The log-probability of the answer is the sum over the answer's tokens only:

$$ \log \pi(y \mid x) = \sum_{t\,:\ \text{token } t+1 \in y} \log \operatorname{softmax}(z_t)[\text{token}_{t+1}], $$

with $z_t$ the logits at position $t$. A `completion_mask` marks the answer's tokens (1) against the
prompt's and the padding (0); token $t+1$ counts when `completion_mask[t + 1] == 1`.

**The loss.** With $\pi_c = \log \pi_\theta(y_w|x)$, $\pi_r = \log \pi_\theta(y_l|x)$ and the same
for the reference, per pair:

$$ h = \beta\,\big[(\pi_c - \text{ref}_c) - (\pi_r - \text{ref}_r)\big], \qquad
   \ell = -\log \sigma(h) = \log(1 + e^{-h}). $$

$\beta \cdot (\pi - \text{ref})$ is the "implicit reward" of an answer; the loss pushes the chosen
answer's reward above the rejected one's. At the start $\pi_\theta = \pi_{\text{ref}}$, $h = 0$ and
$\ell = \log 2$ whatever $\beta$. Use `torch.nn.functional.logsigmoid` for a stable $\log\sigma$.

## Your task

1. `completion_logps(logits, input_ids, completion_mask)`: the summed log-probability of each
   row's answer, shape (S,), from logits (S, T, V) and `input_ids`, `completion_mask` (S, T),
   computed in fp32.
2. `dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)`: $\ell$ per pair, (P,).

The tests check worked numbers, minilora's DPO loss, and TRL's `DPOTrainer` on a batch its own
collator built (its rows: the P chosen sequences, then the P rejected ones).

Run: `pytest docs/exercises/test_ex11_dpo.py`
"""

import torch
import torch.nn.functional as F


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Σ log p(answer token | everything before it) per row: (S, T, V), (S, T), (S, T) -> (S,)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (S, T-1, V): position t predicts t+1
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (S, T-1)
    return (token_logp * completion_mask[:, 1:]).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """−log σ(β[(π_c − ref_c) − (π_r − ref_r)]) per pair."""
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(h)
