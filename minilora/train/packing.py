r"""Packed rows: several examples back to back in one row, instead of one example padded to --seq-len.

A padded batch spends its compute on padding: with examples of varied lengths, most of a row can be
pad tokens. Packing fills rows with whole examples (first fit, longest first), and tells the model
where each one starts through `position_ids`, which restart at 0 at every example:

    input_ids     a1 a2 a3 b1 b2 c1 c2 c3 c4 ·  ·        (· : padding after the last example)
    position_ids   0  1  2  0  1  0  1  2  3 0  1
    labels        -  a2 a3  -  b2  -  c2 c3 c4 -  -      (- : -100, not scored)

No attention mask and no cache are passed (data.model_inputs): transformers then reads the examples off the position ids (a new one
wherever the position does not rise by one; masking_utils.find_packed_sequence_indices) and builds
a causal mask in which a token attends only to earlier tokens of its own example. Rotary and learned
absolute positions both restart with the position ids, so each example is computed exactly as it
would be alone. The first label of every example is -100: its token would be predicted from the
last token of the example before, and alone it is never predicted either (position t predicts
t + 1), so the scored tokens are the same as without packing.

Preference pairs pack whole (`pack_pairs`): a row of 2·seq_len tokens (what one padded pair takes)
holds pairs back to back, each its chosen answer's sequence (prompt + answer) then its rejected
one's, and a SEQUENCE tensor names the answer each token belongs to, so that a pair's log-probs are
sums over it and both answers of a pair are always in the same micro-batch.

Honoured by the attention implementations that build their mask with transformers'
`create_causal_mask` (eager, sdpa, flex_attention) and by flash_attention_2, which reads the
position ids itself. A model that builds its own mask (an older architecture) would let examples
see each other: `check_model` refuses those.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import IGNORE, DataError, Examples

PACKABLE_TASKS = ("domain", "instruction", "preference")
SEQUENCE = "sequence"  # packed pairs: which answer each token belongs to, 2·pair + (0 chosen, 1 rejected); −1 padding


def first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Items (by index) in bins of `capacity`: first fit, largest first; each bin lists its items in order."""
    bins: list[list[int]] = []
    room: list[int] = []  # space left in each bin
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        row = next((r for r, left in enumerate(room) if left >= sizes[i]), None)
        if row is None:
            bins.append([]), room.append(capacity)
            row = len(bins) - 1
        bins[row].append(i)
        room[row] -= sizes[i]
    return [sorted(members) for members in bins]  # in file order within a row


def pack(examples: Examples, seq_len: int, pad_id: int = 0) -> Examples:
    """`examples` (rows padded on the right, attention_mask marking the real tokens) as packed rows of
    `seq_len` tokens: input_ids, labels and position_ids (M, seq_len), M ≤ N; see the module docstring.
    Preference pairs: `pack_pairs`."""
    if examples.task == "preference":
        return pack_pairs(examples, seq_len, pad_id)
    if examples.task not in PACKABLE_TASKS:
        raise DataError(f"--pack packs {', '.join(PACKABLE_TASKS)} rows; {examples.task} rows are not packed")
    lengths = examples.tensors["attention_mask"].sum(1).tolist()
    ids, labels = examples.tensors["input_ids"], examples.tensors["labels"]
    bins = first_fit(lengths, seq_len)
    packed = _empty(len(bins), seq_len, pad_id)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            _place(packed, r, start, ids[i, :lengths[i]], labels[i, :lengths[i]])
            start += lengths[i]
        packed["position_ids"][r, start:] = torch.arange(seq_len - start)  # the padding: an example of its own
    return Examples(packed, examples.task, examples.label_names)


def pack_pairs(examples: Examples, seq_len: int, pad_id: int = 0) -> Examples:
    """Preference pairs (N, 2, T) as packed rows of 2·`seq_len` tokens (what one padded pair takes), each
    pair whole in one row, its chosen answer's sequence then its rejected one's: input_ids, labels,
    position_ids and SEQUENCE (M, 2·seq_len). A pair's log-probs are the sums of its tokens' over
    each SEQUENCE value (preference.sequence_logps)."""
    lengths = examples.tensors["attention_mask"].sum(-1).tolist()  # (N, 2)
    ids, labels = examples.tensors["input_ids"], examples.tensors["labels"]
    width = 2 * seq_len
    bins = first_fit([a + b for a, b in lengths], width)
    packed = _empty(len(bins), width, pad_id)
    packed[SEQUENCE] = torch.full((len(bins), width), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            for answer in (0, 1):
                n = lengths[i][answer]
                _place(packed, r, start, ids[i, answer, :n], labels[i, answer, :n])
                packed[SEQUENCE][r, start:start + n] = 2 * i + answer
                start += n
        packed["position_ids"][r, start:] = torch.arange(width - start) % seq_len  # no position past seq_len
    return Examples(packed, examples.task, examples.label_names)


def _empty(rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    return {name: torch.full((rows, width), fill, dtype=torch.long)
            for name, fill in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0))}


def _place(packed: dict[str, torch.Tensor], row: int, start: int, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """One example's tokens at `start` of packed row `row`, its positions from 0, its first label unscored."""
    n = len(ids)
    packed["input_ids"][row, start:start + n] = ids
    packed["labels"][row, start:start + n] = labels
    packed["labels"][row, start] = IGNORE  # predicted from the example before: never scored
    packed["position_ids"][row, start:start + n] = torch.arange(n)


def check_model(model: nn.Module) -> None:
    """Refuse a model that would not keep packed examples apart (see the module docstring): one whose
    attention implementation ignores the position ids, or one that, tried on two short examples
    packed in one row, does not give the second the logits it gets alone (a model that builds its
    own mask, or its positions, from the attention mask alone: OPT, for one)."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    implementation = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    if implementation not in ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"--pack needs an attention implementation that keeps packed examples apart (eager, sdpa, "
                         f"flex_attention, flash_attention_2); this model uses {implementation!r}: train without "
                         "--pack")
    leak = packing_error(hf)
    if leak > PROBE_TOLERANCE[hf.dtype == torch.float32]:
        raise ValueError(f"--pack: {type(hf).__name__} does not keep packed examples apart (an example's logits "
                         f"change by {leak:.2g} of their size when another example precedes it in the row; it "
                         "builds its mask or positions without the position ids): train without --pack")


PROBE_TOLERANCE = {True: 1e-4, False: 2e-2}  # fp32, half precision: rounding only; a leak moves logits by O(1)


@torch.no_grad()
def packing_error(model: nn.Module) -> float:
    """max |logits packed − logits alone| / max |logits alone| of a 4-token example that follows a 3-token
    one in a packed row, in eval mode."""
    device = next(model.parameters()).device
    ids = (torch.arange(7, device=device) * 37 + 5) % model.config.vocab_size  # any tokens
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=ids[None], position_ids=positions, use_cache=False).logits[0, 3:].float()
        alone = model(input_ids=ids[None, 3:], use_cache=False).logits[0].float()  # (4, V)
    finally:
        model.train(was_training)
    return ((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-12)).item()
