"""Training data: JSON Lines examples, prompt rendering, tokenization with loss masks, batching.

This module owns everything between a ``.jsonl`` file and a padded batch of
tensors. It reads three example shapes, one JSON object per line:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``.
  The loss covers the output (plus EOS) only.
* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with
  the tokenizer's chat template. The loss covers the assistant turns only.
* text: ``{"text": str}``. The loss covers every token.

Prompt tokens carry the label -100 (ignored by the loss). Prompts are rendered
and encoded by `lorakit.prompts` (`render_prompt`, `encode_prompt`), which
generation, evaluation and the server use too, so the model sees at inference
exactly the prompt it was trained on.

A malformed line raises `DataError`, naming the file, the 1-based line number
and the problem.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from ..prompts import encode_prompt, require_chat_template

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)

ALPACA, CHAT, TEXT = "alpaca", "chat", "text"
CHAT_ROLES = ("system", "user", "assistant", "tool")



class DataError(ValueError):
    """A data file or one of its lines is malformed.

    Attributes:
        path: The file.
        line: The 1-based line number, or None for a problem with the whole file.
        problem: What is wrong.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


# --------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def example_shape(example: dict) -> str:
    """Which shape an example has, checking its fields.

    Args:
        example: One parsed JSON object.

    Returns:
        ``"alpaca"``, ``"chat"`` or ``"text"``.

    Raises:
        ValueError: If the shape is unknown or ambiguous, a field is missing,
            or a field has the wrong type; the message says which.
    """
    if not isinstance(example, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(example)}")
    shapes = []
    if "instruction" in example or "output" in example:
        shapes.append(ALPACA)
    if "messages" in example:
        shapes.append(CHAT)
    if "text" in example:
        shapes.append(TEXT)
    if not shapes:
        raise ValueError(
            f"unknown example shape, keys {sorted(example)}: expected 'instruction' and "
            f"'output' (Alpaca), 'messages' (chat) or 'text'"
        )
    if len(shapes) > 1:
        raise ValueError(f"ambiguous example: it has the keys of more than one shape ({', '.join(shapes)})")
    shape = shapes[0]
    if shape == ALPACA:
        _check_alpaca(example)
    elif shape == CHAT:
        _check_chat(example["messages"])
    elif not isinstance(example["text"], str) or not example["text"]:
        raise ValueError(f"field 'text' must be a non-empty string, got {_type_name(example['text'])}")
    return shape


def _check_alpaca(example: dict) -> None:
    for key in ("instruction", "output"):
        if key not in example:
            raise ValueError(f"missing field {key!r} (Alpaca examples need 'instruction' and 'output')")
        if not isinstance(example[key], str):
            raise ValueError(f"field {key!r} must be a string, got {_type_name(example[key])}")
    if example.get("input") is not None and not isinstance(example["input"], str):
        raise ValueError(f"field 'input' must be a string, got {_type_name(example['input'])}")


def _check_chat(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field 'messages' must be a non-empty list, got {_type_name(messages)}")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(f"message {number} must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {number} is missing field {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"message {number} field {key!r} must be a string, got {_type_name(message[key])}"
                )
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"message {number} has unknown role {message['role']!r} (expected one of {', '.join(CHAT_ROLES)})"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: a chat example needs at least one to learn from")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a JSON Lines file of examples.

    Blank lines are skipped. Shapes may be mixed within a file.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The examples, as parsed dicts, in file order.

    Raises:
        DataError: If the file is missing, not UTF-8, empty, or a line is not
            a valid example (bad JSON, unknown shape, missing field, wrong type).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    examples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(path, number, f"not valid UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(path, number, f"invalid JSON: {error.msg} at column {error.colno}") from None
            try:
                example_shape(example)
            except ValueError as error:
                raise DataError(path, number, str(error)) from None
            examples.append(example)
    if not examples:
        raise DataError(path, None, "empty file: no examples")
    return examples


def split_validation(
    examples: Sequence[dict], fraction: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Hold out a random fraction of the examples for validation.

    Args:
        examples: All examples.
        fraction: Share held out, in [0, 1). At least one example is held out
            when it is positive, and at least one kept for training.
        seed: Seed of the random choice; the same seed gives the same split.

    Returns:
        (train, validation), each in the original order.

    Raises:
        ValueError: If `fraction` is outside [0, 1), or positive with fewer
            than two examples.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(examples), []
    if len(examples) < 2:
        raise ValueError(f"cannot hold out a validation split from {len(examples)} example(s)")
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [ex for i, ex in enumerate(examples) if i in held]
    return train, val


def load_splits(
    train_path: str | Path,
    val_path: str | Path | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Read training examples and a validation split.

    Args:
        train_path: Training ``.jsonl`` file.
        val_path: Validation ``.jsonl`` file, or None.
        val_fraction: Without `val_path`, the share of the training file to
            hold out (see `split_validation`). Defaults to 0 (no validation).
        seed: Seed of the held-out choice.

    Returns:
        (train, validation) example lists; validation may be empty.

    Raises:
        DataError: If a file is malformed (see `read_jsonl`).
        ValueError: If both `val_path` and a positive `val_fraction` are given.
    """
    examples = read_jsonl(train_path)
    if val_path is not None:
        if val_fraction:
            raise ValueError("give either a validation file or a validation fraction, not both")
        return examples, read_jsonl(val_path)
    return split_validation(examples, val_fraction, seed)


# --------------------------------------------------------------------------
# Tokenization with loss masks
# --------------------------------------------------------------------------


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; lorakit appends one after every response")
    return tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_segments(messages: Sequence[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant) pieces.

    Each assistant turn's text is what the template adds when that message is
    appended after the generation prompt (content plus the template's
    end-of-turn marker). Messages after the last assistant one are dropped.
    """
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as a growing "
                "prefix, so assistant turns cannot be located for the loss mask"
            )
        segments.append((prompt[len(rendered):], False))
        segments.append((full[len(prompt):], True))
        rendered = full
    return segments


def tokenize_example(example: dict, tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels for one example.

    Alpaca: ``encode_prompt`` ids (label -100), then the output's ids and EOS
    (labelled with themselves). The prompt and the response are tokenized
    separately, as at inference, where the model continues the prompt ids.
    Chat: each assistant turn is labelled, everything else is -100; EOS is
    appended after the last assistant turn unless the template already put
    the EOS token there. Text: the tokenizer's ids (with its special tokens)
    and EOS, all labelled.

    Args:
        example: A validated example (see `read_jsonl`).
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_seq_len: Maximum length; longer sequences are cut on the right.

    Returns:
        ``{"input_ids": [T], "labels": [T]}`` with T <= max_seq_len; a label
        is the token id itself where the token carries loss, else -100.

    Raises:
        ValueError: If the example is malformed, the tokenizer has no EOS, or
            (chat) no usable chat template.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    shape = example_shape(example)
    eos = _eos_id(tokenizer)
    if shape == ALPACA:
        prompt = encode_prompt(example, tokenizer)
        response = _encode(tokenizer, example["output"]) + [eos]
        input_ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
    elif shape == CHAT:
        require_chat_template(tokenizer)
        segments = _chat_segments(example["messages"], tokenizer)
        input_ids, labels = [], []
        for text, trained in segments:
            ids = _encode(tokenizer, text)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if tokenizer.eos_token not in segments[-1][0]:
            input_ids.append(eos)
            labels.append(eos)
    else:
        input_ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"] + [eos]
        labels = list(input_ids)
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def tokenize_examples(examples: Sequence[dict], tokenizer, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenize examples, dropping those left with no labelled token.

    An example whose prompt fills `max_seq_len` has nothing to learn from; it
    is dropped with a logged warning giving the count.

    Args:
        examples: Validated examples.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_seq_len: Maximum sequence length.

    Returns:
        A list of ``{"input_ids", "labels"}`` dicts (usable as a map-style
        dataset by ``torch.utils.data.DataLoader`` with `collate`).
    """
    features = [tokenize_example(example, tokenizer, max_seq_len) for example in examples]
    kept = [f for f in features if any(label != IGNORE_INDEX for label in f["labels"])]
    if len(kept) < len(features):
        logger.warning(
            "dropped %d of %d examples whose prompt fills max_seq_len=%d (no response tokens left)",
            len(features) - len(kept), len(features), max_seq_len,
        )
    return kept


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token.

    Raises:
        ValueError: If the tokenizer has neither.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return _eos_id(tokenizer)


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence, on the right.

    Use with a DataLoader as ``collate_fn=functools.partial(collate, pad_token_id=...)``.

    Args:
        features: Dicts from `tokenize_example`.
        pad_token_id: Id written into padding positions of ``input_ids``.

    Returns:
        ``input_ids`` [B, T] (int64), ``attention_mask`` [B, T] (int64, 1 on
        real tokens) and ``labels`` [B, T] (int64, -100 on padding), where T is
        the longest sequence in the batch.

    Raises:
        ValueError: If `features` is empty.
    """
    if not features:
        raise ValueError("cannot collate an empty batch")
    length = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
