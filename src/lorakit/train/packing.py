"""Packing: several tokenized examples in one row of up to max_seq_len tokens, none attending to another.

    rows = pack_examples(features, max_seq_len=1024)        # features from data.tokenize_examples
    batch = collate_packed(rows[:8], pad_token_id=pad_id)    # input_ids, position_ids, labels: [B, T]
    logits = model(**model_inputs(batch)).logits             # no attention_mask, use_cache=False

The mechanism is transformers' own (5.x, ``masking_utils``): when a causal LM is called with
``position_ids`` and *no* ``attention_mask`` (and no cache), ``find_packed_sequence_indices``
reads every restart of the positions as the start of a new sequence, and ``create_causal_mask``
builds the block-diagonal causal mask from it for eager, sdpa and flex attention; flash
attention takes the same restarts as ``cu_seqlens`` (``prepare_fa_kwargs_from_position_ids``).
So a packed row carries restarting ``position_ids`` and nothing else: no hand-made 4-D mask.
Two things defeat it silently, and `model_inputs` avoids both: passing an ``attention_mask``
(even all ones), and a cache (an eval-mode model with ``use_cache`` makes one). A model whose
attention does not build its mask through ``masking_utils`` would let tokens attend across
examples; `check_packing_support` runs the model once on a tiny packed input and refuses it.

Labels: the first token of every example is labelled -100, so the last token of one example is
never trained to predict the first token of the next. With next-token shifting (position t
predicts label t+1) the loss then covers exactly the response tokens it covers unpacked, where an
example's first token has no predecessor either.

An example longer than max_seq_len is refused (`PackingError`), not cut: `tokenize_examples` with
the same max_seq_len already cuts every example to fit, so a longer one means the two lengths
disagree, and cutting here would drop response tokens without a word.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import torch

from .data import IGNORE_INDEX


class PackingError(ValueError):
    """An example cannot be packed, or a model cannot keep packed examples apart."""


def pack_examples(
    features: Sequence[dict[str, list[int]]],
    max_seq_len: int,
    *,
    strategy: Literal["best_fit", "in_order"] = "best_fit",
) -> list[dict[str, list[int]]]:
    """Pack tokenized examples into rows of at most `max_seq_len` tokens.

    Args:
        features: ``{"input_ids": [L_i], "labels": [L_i]}`` dicts, as
            `lorakit.train.data.tokenize_examples` returns them.
        max_seq_len: Most tokens in a row.
        strategy: ``"best_fit"`` (best-fit decreasing: longest examples first,
            each into the fullest row it fits; fewest rows, order not kept) or
            ``"in_order"`` (examples in their order, a new row whenever the next
            does not fit).

    Returns:
        Rows ``{"input_ids": [L], "labels": [L], "lengths": [k]}``: the k
        examples' tokens one after another (L = sum(lengths) <= max_seq_len),
        labels as given except -100 on each example's first token.

    Raises:
        PackingError: If an example is empty or longer than `max_seq_len`.
        ValueError: If `max_seq_len` < 1 or `strategy` is unknown.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    lengths = [len(feature["input_ids"]) for feature in features]
    for index, length in enumerate(lengths):
        if length == 0:
            raise PackingError(f"example {index} has no tokens")
        if length > max_seq_len:
            raise PackingError(
                f"example {index} has {length} tokens, more than max_seq_len={max_seq_len}: tokenize with the "
                "same max_seq_len (tokenize_examples cuts each example to it) rather than packing it cut"
            )
    if strategy == "in_order":
        bins: list[list[int]] = []
        used = max_seq_len
        for index, length in enumerate(lengths):
            if used + length > max_seq_len:
                bins.append([])
                used = 0
            bins[-1].append(index)
            used += length
    elif strategy == "best_fit":
        bins = []
        free: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the fullest bin that fits is the first >= length
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            slot = bisect.bisect_left(free, (lengths[index], -1))
            if slot == len(free):
                bins.append([index])
                left, where = max_seq_len - lengths[index], len(bins) - 1
            else:
                left, where = free.pop(slot)
                bins[where].append(index)
                left -= lengths[index]
            if left > 0:
                bisect.insort(free, (left, where))
    else:
        raise ValueError(f"unknown packing strategy {strategy!r}: expected 'best_fit' or 'in_order'")
    return [_row([features[i] for i in members]) for members in bins]


def _row(members: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for feature in members:
        input_ids += feature["input_ids"]
        labels += [IGNORE_INDEX] + list(feature["labels"][1:])  # the first token is not predicted across the boundary
    return {"input_ids": input_ids, "labels": labels, "lengths": [len(f["input_ids"]) for f in members]}


def position_ids(lengths: Sequence[int]) -> list[int]:
    """Positions restarting at 0 for each example: lengths [3, 2] -> [0, 1, 2, 0, 1]."""
    return [position for length in lengths for position in range(length)]


def collate_packed(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of packed rows to its longest row, on the right.

    The padding is one more sequence of its own (positions from 0, label
    -100), so it attends only to itself and no real token attends to it.
    Use with a DataLoader as ``collate_fn=functools.partial(collate_packed, pad_token_id=...)``;
    call the model with `model_inputs` of the result.

    Args:
        rows: Rows from `pack_examples`.
        pad_token_id: Id written into padding positions of ``input_ids``.

    Returns:
        ``input_ids`` [B, T], ``position_ids`` [B, T] (restarting at 0 for every
        example) and ``labels`` [B, T] (-100 on padding and on each example's
        first token), all int64, T the longest row. No ``attention_mask``: its
        presence would turn transformers' packed-sequence masking off. (The
        real tokens of the batch number ``sum(len(r["input_ids"]) for r in rows)``.)

    Raises:
        ValueError: If `rows` is empty.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # [B, T]
    positions = torch.zeros((len(rows), length), dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(row["labels"], dtype=torch.long)
        positions[b, :n] = torch.tensor(position_ids(row["lengths"]), dtype=torch.long)
        positions[b, n:] = torch.arange(length - n)  # the padding: a sequence of its own
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a causal LM's forward for a packed batch.

    Returns:
        ``{"input_ids": [B, T], "position_ids": [B, T], "use_cache": False}``:
        no attention mask and no cache, which is when transformers reads the
        position restarts as sequence boundaries.
    """
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


@torch.no_grad()
def check_packing_support(model, *, rtol: float | None = None) -> None:
    """Refuse a model that lets packed examples attend to each other.

    Runs `model` (eval mode for the call, then put back) on two short random
    examples packed in one row and on the second alone; the second example's
    logits must match. Costs two forwards of 12 tokens.

    Args:
        model: A causal LM (or a `PeftModel` around one) taking ``input_ids``,
            ``position_ids`` and ``use_cache``, with ``config.vocab_size``.
        rtol: Largest allowed difference relative to the logits' largest
            magnitude; 1e-3 for float32 parameters, 5e-2 otherwise, by default.

    Raises:
        PackingError: If the logits differ: the model's attention ignores the
            position restarts (it does not build its mask through transformers'
            ``masking_utils``), so packing would mix examples.
    """
    parameter = next(model.parameters())
    if rtol is None:
        rtol = 1e-3 if parameter.dtype == torch.float32 else 5e-2
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    first = torch.randint(0, vocab, (1, 5), generator=generator).to(parameter.device)  # [1, 5]
    second = torch.randint(0, vocab, (1, 7), generator=generator).to(parameter.device)  # [1, 7]
    packed = torch.cat([first, second], dim=1)  # [1, 12]
    positions = torch.tensor([position_ids([5, 7])], device=parameter.device)  # [1, 12]
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=second, position_ids=positions[:, 5:], use_cache=False).logits.float()  # [1, 7, V]
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits.float()[:, 5:]  # [1, 7, V]
    finally:
        model.train(was_training)
    difference = float((together - alone).abs().max())
    if difference > rtol * float(alone.abs().max()):
        raise PackingError(
            f"{type(model).__name__} lets packed examples attend to each other (logits of the second example "
            f"differ by {difference:.3g} once the first precedes it): its attention does not take sequence "
            "boundaries from position_ids; train it without packing"
        )
