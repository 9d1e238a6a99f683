"""Tests for lorakit.train.packing: rows, boundary labels, collation, and the loss of a real tiny Llama
packed against unpacked (eager and sdpa attention)."""

import pytest
import torch
from conftest import tiny_llama
from transformers.masking_utils import find_packed_sequence_indices

from lorakit.train import data, packing
from lorakit.train.data import IGNORE_INDEX as X


def example(first: int, length: int, prompt: int = 0) -> dict[str, list[int]]:
    """Ids first, first+1, ... (distinct across examples), the first `prompt` of them unlabelled."""
    ids = [(first + i) % 100 for i in range(length)]
    return {"input_ids": ids, "labels": [X] * prompt + ids[prompt:]}


FEATURES = [example(1, 6, 2), example(10, 5, 1), example(20, 4, 3), example(30, 3, 0), example(40, 2, 1)]


# --------------------------------------------------------------------------
# Rows and boundary labels
# --------------------------------------------------------------------------


def test_best_fit_fills_the_fewest_rows():
    rows = packing.pack_examples(FEATURES, max_seq_len=10)
    # Longest first, each into the fullest row it fits: 6+4, then 5+3+2.
    assert [row["lengths"] for row in rows] == [[6, 4], [5, 3, 2]]
    assert rows[0]["input_ids"] == FEATURES[0]["input_ids"] + FEATURES[2]["input_ids"]


def test_in_order_keeps_the_order_and_starts_a_row_when_the_next_does_not_fit():
    rows = packing.pack_examples(FEATURES, max_seq_len=10, strategy="in_order")
    assert [row["lengths"] for row in rows] == [[6], [5, 4], [3, 2]]
    assert [i for row in rows for i in row["input_ids"]] == [i for f in FEATURES for i in f["input_ids"]]


@pytest.mark.parametrize("strategy", ["best_fit", "in_order"])
def test_every_example_once_and_its_first_token_unlabelled(strategy):
    rows = packing.pack_examples(FEATURES, max_seq_len=11, strategy=strategy)
    pieces = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["lengths"]) <= 11
        start = 0
        for length in row["lengths"]:
            ids, labels = row["input_ids"][start:start + length], row["labels"][start:start + length]
            original = next(f for f in FEATURES if f["input_ids"] == ids)
            assert labels == [X] + original["labels"][1:]
            pieces.append(ids)
            start += length
    assert sorted(pieces) == sorted(f["input_ids"] for f in FEATURES)


def test_response_tokens_counted_by_the_shifted_loss_are_the_same_packed():
    # The loop counts labels[:, 1:] != -100 (position t predicts label t+1): index 0 never counts.
    unpacked = sum(sum(label != X for label in f["labels"][1:]) for f in FEATURES)
    batch = packing.collate_packed(packing.pack_examples(FEATURES, max_seq_len=10), pad_token_id=0)
    assert int((batch["labels"][:, 1:] != X).sum()) == unpacked


def test_an_example_longer_than_max_seq_len_is_refused_not_cut():
    with pytest.raises(packing.PackingError, match="example 0 has 6 tokens, more than max_seq_len=5"):
        packing.pack_examples(FEATURES, max_seq_len=5)
    with pytest.raises(packing.PackingError, match="no tokens"):
        packing.pack_examples([{"input_ids": [], "labels": []}], max_seq_len=5)
    with pytest.raises(ValueError, match="strategy"):
        packing.pack_examples(FEATURES, max_seq_len=10, strategy="first_fit")


# --------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------


def test_collate_packed_restarts_positions_and_pads_as_a_sequence_of_its_own():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [X, 6, X, X, 9], "lengths": [3, 2]},
            {"input_ids": [1, 2, 3], "labels": [X, 2, 3], "lengths": [3]}]
    batch = packing.collate_packed(rows, pad_token_id=0)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: it would disable packing
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[X, 6, X, X, 9], [X, 2, 3, X, X]]
    assert all(t.dtype == torch.long for t in batch.values())
    # transformers reads the same boundaries from these positions.
    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert packing.model_inputs(batch) == {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                                           "use_cache": False}
    with pytest.raises(ValueError, match="empty"):
        packing.collate_packed([], pad_token_id=0)


# --------------------------------------------------------------------------
# A real model: packed losses equal unpacked ones
# --------------------------------------------------------------------------


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy: logits [B, T, V], labels [B, T] -> [B, T-1] (0 where unlabelled)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=X, reduction="none")


def unpacked_losses(model, features) -> dict[tuple[int, ...], torch.Tensor]:
    """Each example alone through data.collate (padded batch, attention mask): its labelled tokens' losses."""
    batch = data.collate(features, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    losses = token_losses(logits, batch["labels"])  # [B, T-1]
    mask = batch["labels"][:, 1:] != X  # [B, T-1]
    return {tuple(f["input_ids"]): losses[b][mask[b]] for b, f in enumerate(features)}


def packed_losses(model, rows) -> dict[tuple[int, ...], torch.Tensor]:
    """The same, from packed rows: each example's labelled tokens' losses, found by its ids."""
    batch = packing.collate_packed(rows, pad_token_id=0)
    with torch.no_grad():
        logits = model(**packing.model_inputs(batch)).logits  # [B, T, V]
    losses = token_losses(logits, batch["labels"])  # [B, T-1]
    out = {}
    for b, row in enumerate(rows):
        start = 0
        for length in row["lengths"]:
            ids = tuple(row["input_ids"][start:start + length])
            # The example's tokens predicted from inside it: shifted positions start .. start+length-2.
            piece = losses[b, start:start + length - 1]  # [length-1]
            labels = batch["labels"][b, start + 1:start + length]  # [length-1]
            out[ids] = piece[labels != X]
            start += length
    return out


@pytest.fixture(params=["eager", "sdpa"])
def model(request):
    return tiny_llama(3, attn_implementation=request.param, max_position_embeddings=64)


@pytest.mark.parametrize("strategy", ["best_fit", "in_order"])
def test_packed_per_token_losses_equal_unpacked(model, strategy):
    features = FEATURES + [example(50, 9, 4), example(60, 1, 0) | {"labels": [60]}, example(70, 7, 2)]
    rows = packing.pack_examples(features, max_seq_len=12, strategy=strategy)
    assert any(len(row["lengths"]) > 1 for row in rows) and len({len(r["input_ids"]) for r in rows}) > 1  # padding too
    expected, got = unpacked_losses(model, features), packed_losses(model, rows)
    assert expected.keys() == got.keys()
    for ids, losses in expected.items():
        assert got[ids].shape == losses.shape
        assert torch.allclose(got[ids], losses, atol=1e-5, rtol=0), ids
    assert sum(t.numel() for t in got.values()) == sum(sum(label != X for label in f["labels"][1:]) for f in features)


def test_without_restarting_positions_examples_would_mix(model):
    # The check above is not vacuous: the same rows with ordinary positions (one causal sequence) differ.
    rows = packing.pack_examples(FEATURES, max_seq_len=12)
    batch = packing.collate_packed(rows, pad_token_id=0)
    with torch.no_grad():
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits
        kept = model(**packing.model_inputs(batch)).logits
    assert (mixed - kept).abs().max() > 1e-3


def test_check_packing_support(model):
    packing.check_packing_support(model)
    assert not model.training


class PositionBlind(torch.nn.Module):
    """A model that drops position_ids: its tokens attend across packed examples."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_check_packing_support_refuses_a_model_that_mixes_examples():
    model = PositionBlind(tiny_llama(3)).train()
    with pytest.raises(packing.PackingError, match="PositionBlind lets packed examples attend to each other"):
        packing.check_packing_support(model)
    assert model.training  # put back


def test_check_packing_support_through_a_lorakit_peft_model():
    from lorakit import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    packing.check_packing_support(peft_model.train())
    assert peft_model.training
    with pytest.raises(packing.PackingError):
        packing.check_packing_support(PositionBlind(peft_model))
