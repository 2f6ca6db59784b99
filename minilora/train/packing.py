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

Honoured by the attention implementations that build their mask with transformers'
`create_causal_mask` (eager, sdpa, flex_attention) and by flash_attention_2, which reads the
position ids itself. A model that builds its own mask (an older architecture) would let examples
see each other: `check_model` refuses those.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import IGNORE, DataError, Examples

PACKABLE_TASKS = ("domain", "instruction")


def pack(examples: Examples, seq_len: int, pad_id: int = 0) -> Examples:
    """`examples` (rows padded on the right, attention_mask marking the real tokens) as packed rows of
    `seq_len` tokens: input_ids, labels and position_ids (M, seq_len), M ≤ N; see the module docstring."""
    if examples.task not in PACKABLE_TASKS:
        raise DataError(f"--pack packs {' and '.join(PACKABLE_TASKS)} rows; {examples.task} rows are not packed")
    lengths = examples.tensors["attention_mask"].sum(1).tolist()
    ids, labels = examples.tensors["input_ids"], examples.tensors["labels"]
    bins: list[list[int]] = []  # examples per packed row
    room: list[int] = []  # tokens left in each row
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # first fit, longest first
        row = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if row is None:
            bins.append([]), room.append(seq_len)
            row = len(bins) - 1
        bins[row].append(i)
        room[row] -= lengths[i]
    packed = {name: torch.full((len(bins), seq_len), fill, dtype=torch.long)
              for name, fill in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0))}
    for r, members in enumerate(bins):
        start = 0
        for i in sorted(members):  # in file order within a row
            n = lengths[i]
            packed["input_ids"][r, start:start + n] = ids[i, :n]
            packed["labels"][r, start:start + n] = labels[i, :n]
            packed["labels"][r, start] = IGNORE  # predicted from the example before: never scored
            packed["position_ids"][r, start:start + n] = torch.arange(n)
            start += n
        packed["position_ids"][r, start:] = torch.arange(seq_len - start)  # the padding: an example of its own
    return Examples(packed, examples.task, examples.label_names)


def check_model(model: nn.Module) -> None:
    """Refuse a model that would not keep packed examples apart (see the module docstring)."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    implementation = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    if implementation not in ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"--pack needs an attention implementation that keeps packed examples apart (eager, sdpa, "
                         f"flex_attention, flash_attention_2); this model uses {implementation!r}: train without "
                         "--pack")
