"""Tests for lorakit.train.data: reading, prompts, loss masks and batching.

A tiny word-level tokenizer is built in code (whitespace split, one id per
word) so every expected token id can be written out by hand.
"""

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lorakit import prompts
from lorakit.train import data
from lorakit.train.data import IGNORE_INDEX as X

WORDS = (
    "<unk> <pad> <s> </s> <|im_start|> <|im_end|> user assistant system hello world hi there "
    "how are you fine ### Instruction: Input: Response: say add two and three five"
).split()
ID = {word: i for i, word in enumerate(WORDS)}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split()]


def make_tokenizer(chat_template: str | None = CHATML, add_bos: bool = False, eos: str = "<|im_end|>"):
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ID["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token=eos,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def tok():
    return make_tokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# Token-level masking
# --------------------------------------------------------------------------


def test_alpaca_with_chat_template_masks_the_prompt(tok):
    example = {"instruction": "add two and three", "output": "five"}
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    prompt = ids("<|im_start|> user add two and three <|im_end|> <|im_start|> assistant")
    assert feature["input_ids"] == prompt + ids("five <|im_end|>")
    assert feature["labels"] == [X] * len(prompt) + ids("five <|im_end|>")


def test_alpaca_input_follows_instruction_in_the_user_message(tok):
    example = {"instruction": "say", "input": "hello world", "output": "hi"}
    assert prompts.render_prompt(example, tok) == (
        "<|im_start|>user\nsay\n\nhello world<|im_end|>\n<|im_start|>assistant\n"
    )
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    assert feature["input_ids"] == ids("<|im_start|> user say hello world <|im_end|> <|im_start|> assistant hi <|im_end|>")
    assert feature["labels"] == [X] * 8 + ids("hi <|im_end|>")


def test_alpaca_plain_template_without_chat_template_adds_bos():
    tok = make_tokenizer(chat_template=None, add_bos=True)
    example = {"instruction": "add two and three", "input": "", "output": "five"}
    assert prompts.render_prompt(example, tok) == "### Instruction:\nadd two and three\n\n### Response:\n"
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    prompt = ids("<s> ### Instruction: add two and three ### Response:")
    assert feature["input_ids"] == prompt + ids("five <|im_end|>")
    assert feature["labels"] == [X] * len(prompt) + ids("five <|im_end|>")


def test_plain_template_with_input():
    tok = make_tokenizer(chat_template=None)
    example = {"instruction": "say", "input": "hello", "output": "hi"}
    assert prompts.render_prompt(example, tok) == "### Instruction:\nsay\n\n### Input:\nhello\n\n### Response:\n"


def test_prompt_used_in_training_is_the_inference_prompt(tok):
    example = {"instruction": "say", "input": "hello world", "output": "hi there"}
    prompt_ids = prompts.encode_prompt({"instruction": "say", "input": "hello world"}, tok)
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    n = len(prompt_ids)
    assert feature["input_ids"][:n] == prompt_ids
    assert feature["labels"][:n] == [X] * n
    assert all(label != X for label in feature["labels"][n:])
    rendered = prompts.render_prompt(example, tok)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == prompt_ids


def test_chat_loss_on_assistant_turns_only(tok):
    example = {
        "messages": [
            {"role": "system", "content": "hi"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "fine"},
        ]
    }
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    pieces = [
        ("<|im_start|> system hi <|im_end|> <|im_start|> user hello <|im_end|> <|im_start|> assistant", False),
        ("hi there <|im_end|>", True),
        ("<|im_start|> user how are you <|im_end|> <|im_start|> assistant", False),
        ("fine <|im_end|>", True),
    ]
    assert feature["input_ids"] == [i for text, _ in pieces for i in ids(text)]
    assert feature["labels"] == [i if trained else X for text, trained in pieces for i in ids(text)]
    # The template's end-of-turn is the EOS token already: none is added.
    assert feature["input_ids"].count(ID["<|im_end|>"]) == 5


def test_chat_appends_eos_when_the_template_does_not_end_with_it():
    template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    tok = make_tokenizer(chat_template=template, eos="</s>")
    example = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    assert feature["input_ids"] == ids("user hello assistant hi </s>")
    assert feature["labels"] == [X, X, X] + ids("hi </s>")


def test_chat_render_prompt_drops_the_final_assistant_message(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    expected = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prompts.render_prompt({"messages": messages}, tok) == expected
    assert prompts.render_prompt({"messages": messages[:1]}, tok) == expected


def test_chat_template_that_is_not_prefix_stable_is_rejected():
    # Renders the last message differently from earlier ones.
    template = (
        "{% for m in messages %}{% if loop.last %}hello {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    tok = make_tokenizer(chat_template=template)
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}
    with pytest.raises(ValueError, match="prefix"):
        data.tokenize_example(example, tok, max_seq_len=64)


def test_chat_needs_a_chat_template():
    tok = make_tokenizer(chat_template=None)
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}
    with pytest.raises(ValueError, match="chat template"):
        data.tokenize_example(example, tok, max_seq_len=64)


def test_text_loss_on_every_token():
    tok = make_tokenizer(add_bos=True)
    feature = data.tokenize_example({"text": "hello world"}, tok, max_seq_len=64)
    assert feature["input_ids"] == ids("<s> hello world <|im_end|>")
    assert feature["labels"] == feature["input_ids"]
    with pytest.raises(ValueError, match="no prompt"):
        prompts.render_prompt({"text": "hello world"}, tok)


def test_truncation_cuts_on_the_right(tok):
    example = {"instruction": "add two and three", "output": "five"}
    feature = data.tokenize_example(example, tok, max_seq_len=10)
    assert feature["input_ids"] == ids("<|im_start|> user add two and three <|im_end|> <|im_start|> assistant five")
    assert feature["labels"] == [X] * 9 + ids("five")


def test_examples_without_response_tokens_are_dropped(tok, caplog):
    examples = [
        {"instruction": "add two and three", "output": "five"},
        {"instruction": "add two and three and two and three", "output": "five"},
    ]
    with caplog.at_level(logging.WARNING, logger="lorakit.train.data"):
        features = data.tokenize_examples(examples, tok, max_seq_len=11)
    assert len(features) == 1
    assert "dropped 1 of 2" in caplog.text


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def test_collate_pads_right_to_the_longest():
    features = [
        {"input_ids": [7, 8, 9], "labels": [X, 8, 9]},
        {"input_ids": [4, 5, 6, 7, 8], "labels": [X, X, X, 7, 8]},
    ]
    batch = data.collate(features, pad_token_id=1)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 1, 1], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, 8, 9, X, X], [X, X, X, 7, 8]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_works_with_a_dataloader(tok):
    from functools import partial

    examples = [{"instruction": "say", "output": "hi"}, {"instruction": "add two and three", "output": "five"}]
    features = data.tokenize_examples(examples, tok, max_seq_len=64)
    loader = torch.utils.data.DataLoader(
        features, batch_size=2, collate_fn=partial(data.collate, pad_token_id=data.pad_token_id(tok))
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 11)
    assert batch["input_ids"][0, -1].item() == ID["<pad>"]


def test_pad_token_id_falls_back_to_eos():
    tok = make_tokenizer()
    assert data.pad_token_id(tok) == ID["<pad>"]
    tok.pad_token = None
    assert data.pad_token_id(tok) == ID["<|im_end|>"]


# --------------------------------------------------------------------------
# Reading files and errors
# --------------------------------------------------------------------------


def test_read_jsonl_mixed_shapes_and_blank_lines(tmp_path):
    lines = [
        json.dumps({"instruction": "a", "input": "b", "output": "c"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}),
        json.dumps({"text": "t", "id": 3}),
    ]
    examples = data.read_jsonl(write_lines(tmp_path / "d.jsonl", lines))
    assert [data.example_shape(e) for e in examples] == ["alpaca", "chat", "text"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"instruction": "a", "output": ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object, got list"),
        ('{"prompt": "a", "completion": "b"}', "unknown example shape"),
        ('{"instruction": "a"}', "missing field 'output'"),
        ('{"output": "a"}', "missing field 'instruction'"),
        ('{"instruction": 3, "output": "a"}', "field 'instruction' must be a string, got int"),
        ('{"instruction": "a", "input": ["x"], "output": "a"}', "field 'input' must be a string"),
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "message 1 is missing field 'content'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"text": null}', "'text' must be a non-empty string"),
        ('{"text": "a", "messages": []}', "ambiguous"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, line, problem):
    good = json.dumps({"text": "fine"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(data.DataError) as info:
        data.read_jsonl(path)
    assert info.value.line == 3
    assert problem in info.value.problem
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_empty_file_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(data.DataError, match="empty file") as info:
        data.read_jsonl(path)
    assert info.value.line is None
    with pytest.raises(data.DataError, match="not found"):
        data.read_jsonl(tmp_path / "nope.jsonl")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match="UTF-8") as info:
        data.read_jsonl(path)
    assert info.value.line == 2


# --------------------------------------------------------------------------
# Validation splits
# --------------------------------------------------------------------------


def test_split_validation_is_seeded_and_disjoint():
    examples = [{"text": str(i)} for i in range(10)]
    train, val = data.split_validation(examples, 0.2, seed=1)
    assert len(train) == 8 and len(val) == 2
    assert sorted(e["text"] for e in train + val) == sorted(e["text"] for e in examples)
    assert data.split_validation(examples, 0.2, seed=1) == (train, val)
    assert data.split_validation(examples, 0.0) == (examples, [])
    assert len(data.split_validation(examples, 0.01)[1]) == 1
    with pytest.raises(ValueError):
        data.split_validation(examples, 1.0)
    with pytest.raises(ValueError):
        data.split_validation(examples[:1], 0.5)


def test_load_splits_with_file_or_fraction(tmp_path):
    train_file = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": str(i)}) for i in range(4)])
    val_file = write_lines(tmp_path / "val.jsonl", [json.dumps({"text": "v"})])
    train, val = data.load_splits(train_file, val_file)
    assert len(train) == 4 and val == [{"text": "v"}]
    train, val = data.load_splits(train_file, val_fraction=0.25, seed=0)
    assert len(train) == 3 and len(val) == 1
    with pytest.raises(ValueError, match="either"):
        data.load_splits(train_file, val_file, val_fraction=0.5)
