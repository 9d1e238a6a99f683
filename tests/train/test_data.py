"""Tests for lorakit.train.data: reading (JSON Lines, and every format through `datasets`), prompts,
loss masks, validation splits and batching.

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
        ('{"question": "a", "answer": "b"}', "unknown example shape, columns ['answer', 'question']"),
        ('{"prompt": "a"}', "missing field 'completion'"),
        ('{"prompt": "a", "completion": ""}', "'completion' must be a non-empty string"),
        ('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}', "must both be strings or both lists"),
        ('{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "bot", "content": "b"}]}',
         "completion message 1 has unknown role 'bot'"),
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
@pytest.mark.parametrize("reader", ["read_jsonl", "datasets"])
def test_malformed_line_names_file_line_and_problem(tmp_path, line, problem, reader):
    good = json.dumps({"text": "fine"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(data.DataError) as info:
        if reader == "read_jsonl":
            data.read_jsonl(path)
        else:
            data.load_dataset_files(path, cache_dir=tmp_path / "cache")
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


# --------------------------------------------------------------------------
# Prompt/completion (TRL's shape), plain and conversational
# --------------------------------------------------------------------------


def test_plain_prompt_completion_masks_the_prompt_and_adds_bos_and_eos():
    tok = make_tokenizer(add_bos=True)
    example = {"prompt": "add two and three", "completion": "five"}
    assert data.example_shape(example) == "prompt_completion"
    assert prompts.render_prompt(example, tok) == "add two and three"  # no template: the prompt as it is
    prompt = ids("<s> add two and three")
    assert prompts.encode_prompt(example, tok) == prompt
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    assert feature["input_ids"] == prompt + ids("five <|im_end|>")
    assert feature["labels"] == [X] * len(prompt) + ids("five <|im_end|>")


def test_conversational_prompt_completion_masks_every_prompt_turn(tok):
    # Unlike a chat example, an assistant turn inside the prompt carries no loss.
    example = {
        "prompt": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                   {"role": "user", "content": "how are you"}],
        "completion": [{"role": "assistant", "content": "fine"}],
    }
    assert data.example_shape(example) == "chat_prompt_completion"
    prompt = ids("<|im_start|> user hello <|im_end|> <|im_start|> assistant hi <|im_end|> "
                 "<|im_start|> user how are you <|im_end|> <|im_start|> assistant")
    assert prompts.encode_prompt(example, tok) == prompt
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    # The template's end-of-turn is the EOS token: none is added.
    assert feature["input_ids"] == prompt + ids("fine <|im_end|>")
    assert feature["labels"] == [X] * len(prompt) + ids("fine <|im_end|>")


def test_conversational_completion_gets_eos_when_the_template_has_none():
    template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    tok = make_tokenizer(chat_template=template, eos="</s>")
    example = {"prompt": [{"role": "user", "content": "hello"}], "completion": [{"role": "assistant", "content": "hi"}]}
    feature = data.tokenize_example(example, tok, max_seq_len=64)
    assert feature["input_ids"] == ids("user hello assistant hi </s>")
    assert feature["labels"] == [X, X, X] + ids("hi </s>")


def test_conversational_prompt_completion_needs_a_prefix_stable_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        data.tokenize_example({"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "hi"}]},
                              make_tokenizer(chat_template=None), max_seq_len=64)
    template = "{% for m in messages %}{% if loop.last %}hello {% endif %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(ValueError, match="prefix"):
        data.tokenize_example({"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "there"}]},
                              make_tokenizer(chat_template=template), max_seq_len=64)


# --------------------------------------------------------------------------
# Files through `datasets`: formats, globs, mixing, field mapping, row errors
# --------------------------------------------------------------------------

RECORDS = [
    {"instruction": "add two and three", "input": "hello", "output": "five"},
    {"instruction": "say", "output": "hi there"},
]


def write_format(path, records, kind):
    """Write `records` as `kind` (jsonl, json array, parquet, csv, or a save_to_disk folder)."""
    import datasets

    if kind == "jsonl":
        return write_lines(path.with_suffix(".jsonl"), [json.dumps(r) for r in records])
    if kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(records), encoding="utf-8")
        return path
    columns = sorted({key for r in records for key in r})
    table = datasets.Dataset.from_dict({c: [r.get(c) for r in records] for c in columns})
    if kind == "parquet":
        table.to_parquet(str(path.with_suffix(".parquet")))
        return path.with_suffix(".parquet")
    if kind == "csv":
        table.to_csv(str(path.with_suffix(".csv")), index=False)
        return path.with_suffix(".csv")
    table.save_to_disk(str(path))
    return path


def load(paths, tmp_path, **kwargs):
    return list(data.iter_examples(data.load_dataset_files(paths, cache_dir=tmp_path / "cache", **kwargs)))


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
def test_every_format_gives_the_same_examples(tmp_path, kind):
    path = write_format(tmp_path / "d", RECORDS, kind)
    assert load(path, tmp_path) == RECORDS


def test_json_file_holding_json_lines(tmp_path):
    path = write_lines(tmp_path / "d.json", [json.dumps(r) for r in RECORDS])
    assert load(path, tmp_path) == RECORDS


def test_rows_stay_in_arrow_files_memory_mapped(tmp_path):
    path = write_format(tmp_path / "d", RECORDS * 50, "jsonl")
    dataset = data.load_dataset_files(path, cache_dir=tmp_path / "cache")
    assert len(dataset) == 100
    assert dataset.cache_files and all(str(tmp_path / "cache") in f["filename"] for f in dataset.cache_files)


def test_mixed_shapes_in_one_jsonl_file_through_datasets(tmp_path):
    lines = [
        json.dumps({"instruction": "a", "input": "b", "output": "c"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}),
        json.dumps({"text": "t", "id": 3}),
        json.dumps({"prompt": "p", "completion": "c"}),
    ]
    examples = load(write_lines(tmp_path / "d.jsonl", lines), tmp_path)
    assert [data.example_shape(e) for e in examples] == ["alpaca", "chat", "text", "prompt_completion"]
    assert examples[2] == {"text": "t"}  # a column of no shape is dropped


def test_several_files_and_globs_concatenate_in_order(tmp_path):
    (tmp_path / "parts").mkdir()
    a = write_format(tmp_path / "parts" / "a", RECORDS[:1], "jsonl")
    write_format(tmp_path / "parts" / "b", RECORDS[1:], "jsonl")
    c = write_format(tmp_path / "c", [{"text": "hello world"}], "parquet")
    assert load([str(tmp_path / "parts" / "*.jsonl"), c], tmp_path) == RECORDS + [{"text": "hello world"}]
    assert load([c, a], tmp_path) == [{"text": "hello world"}, RECORDS[0]]
    with pytest.raises(data.DataError, match="no file matches"):
        load(str(tmp_path / "nothing" / "*.jsonl"), tmp_path)


def test_messages_with_different_keys_in_two_files_concatenate(tmp_path):
    first = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    second = {"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "r"}]}
    a = write_format(tmp_path / "a", [first], "jsonl")
    b = write_format(tmp_path / "b", [second], "parquet")
    assert load([a, b], tmp_path) == [first, second]


def test_files_that_give_a_column_two_forms_are_refused(tmp_path):
    plain = write_format(tmp_path / "plain", [{"prompt": "p", "completion": "c"}], "jsonl")
    chat = write_format(tmp_path / "chat", [{"prompt": [{"role": "user", "content": "p"}],
                                             "completion": [{"role": "assistant", "content": "c"}]}], "jsonl")
    assert data.example_shape(load(chat, tmp_path)[0]) == "chat_prompt_completion"
    with pytest.raises(data.DataError, match="column 'prompt' holds lists of messages here but strings") as info:
        load([plain, chat], tmp_path)
    assert info.value.path == str(chat)


def test_field_mapping_renames_columns_onto_a_shape(tmp_path):
    qa = write_format(tmp_path / "qa", [{"question": "say", "answer": "hi", "id": 1}], "parquet")
    assert load(qa, tmp_path, fields={"instruction": "question", "output": "answer"}) == [
        {"instruction": "say", "output": "hi"}]
    body = write_format(tmp_path / "body", [{"body": "hello world"}], "jsonl")
    assert load(body, tmp_path, fields={"text": "body"}) == [{"text": "hello world"}]
    assert data.read_jsonl(body, fields={"text": "body"}) == [{"text": "hello world"}]
    with pytest.raises(ValueError, match="unknown data field 'answer'"):
        load(qa, tmp_path, fields={"answer": "question"})
    with pytest.raises(ValueError, match="no data file has the mapped column"):
        load(qa, tmp_path, fields={"instruction": "question", "output": "answer", "input": "context"})
    with pytest.raises(data.DataError, match=r"columns \['body'\].*the field mapping's column\(s\) 'content' are not"):
        load(body, tmp_path, fields={"text": "content"})
    both = write_format(tmp_path / "both", [{"body": "a", "text": "b"}], "jsonl")
    with pytest.raises(data.DataError, match="has both column 'body'"):
        load(both, tmp_path, fields={"text": "body"})


def test_parse_field_mapping():
    assert data.parse_field_mapping(["instruction=question", "output = answer"]) == {
        "instruction": "question", "output": "answer"}
    for bad in (["instruction"], ["=question"], ["output=a", "output=b"], ["colour=a"], ["text=a", "output=a"]):
        with pytest.raises(ValueError):
            data.parse_field_mapping(bad)


def test_a_row_of_no_shape_names_file_row_and_columns(tmp_path):
    path = write_format(tmp_path / "d", [{"text": "fine", "question": None},
                                         {"text": None, "question": "what"}], "parquet")
    with pytest.raises(data.DataError) as info:
        load(path, tmp_path)
    assert (info.value.path, info.value.line, info.value.unit) == (str(path), 2, "row")
    assert str(info.value) == (f"{path}, row 2: unknown example shape, columns ['question']: expected 'instruction' "
                               "and 'output' (Alpaca), 'messages' (chat), 'text', or 'prompt' and 'completion' "
                               "(null columns: text)")


def test_jsonl_errors_through_datasets_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a"}), "", "  ", json.dumps({"question": "q"})])
    with pytest.raises(data.DataError, match="unknown example shape") as info:
        load(path, tmp_path)
    assert info.value.line == 4 and "line 4" in str(info.value)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match="UTF-8") as info:
        load(latin, tmp_path)
    assert info.value.line == 2


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        load(tmp_path / "nope.jsonl", tmp_path)
    with pytest.raises(data.DataError, match="empty file"):
        load(write_lines(tmp_path / "empty.jsonl", ["", "  "]), tmp_path)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(data.DataError, match="unsupported file type '.txt'"):
        load(tmp_path / "d.txt", tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(data.DataError, match="save_to_disk"):
        load(tmp_path / "folder", tmp_path)


def test_tokenize_examples_reads_a_dataset_as_it_reads_dicts(tmp_path, tok):
    path = write_format(tmp_path / "d", RECORDS, "parquet")
    dataset = data.load_dataset_files(path, cache_dir=tmp_path / "cache")
    assert data.tokenize_examples(dataset, tok, 64) == data.tokenize_examples(RECORDS, tok, 64)


# --------------------------------------------------------------------------
# Validation splits of datasets
# --------------------------------------------------------------------------


def test_split_dataset_holds_out_the_rows_split_validation_does(tmp_path):
    records = [{"text": f"hello {i}"} for i in range(30)]
    dataset = data.load_dataset_files(write_format(tmp_path / "d", records, "jsonl"), cache_dir=tmp_path / "cache")
    train, val = data.split_dataset(dataset, 0.2, seed=3)
    expected = data.split_validation(records, 0.2, seed=3)
    assert (list(data.iter_examples(train)), list(data.iter_examples(val))) == expected
    train, val = data.split_dataset(dataset, 0.0)
    assert len(train) == 30 and len(val) == 0


def test_load_data_with_files_or_fraction(tmp_path):
    train_file = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": str(i)}) for i in range(40)])
    val_file = write_format(tmp_path / "val", [{"text": "v"}], "parquet")
    train, val = data.load_data([train_file], val=val_file, cache_dir=tmp_path / "cache")
    assert len(train) == 40 and list(data.iter_examples(val)) == [{"text": "v"}]
    train, val = data.load_data(train_file, val_fraction=0.5, seed=0, cache_dir=tmp_path / "cache")
    assert len(train) == 20 and len(val) == 20
    with pytest.raises(ValueError, match="either"):
        data.load_data(train_file, val=val_file, val_fraction=0.5, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(("fraction", "warned"), [(0.0, False), (0.1, True), (0.5, False)])
def test_a_small_validation_split_is_warned_about(tmp_path, caplog, fraction, warned):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": str(i)}) for i in range(40)])
    with caplog.at_level(logging.WARNING, logger="lorakit.train.data"):
        _, val = data.load_data(path, val_fraction=fraction, cache_dir=tmp_path / "cache")
    assert len(val) == round(40 * fraction)
    assert ("validation split has only 4 example(s), fewer than 20" in caplog.text) is warned


def test_a_save_to_disk_folder_is_read_not_written(tmp_path):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    folder = write_format(tmp_path / "saved", [chat], "disk")  # its messages get cast to lists of Json
    before = sorted(p.name for p in folder.iterdir())
    assert load(folder, tmp_path) == [chat]
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("form", ["lines", "array"])
def test_date_like_strings_stay_as_written(tmp_path, form):
    # Arrow's JSON reader would turn these into dates and timestamps; a target must stay as written.
    rows = [{"instruction": "iso", "input": "5 March 2021", "output": "2021-03-05"},
            {"instruction": "iso", "input": "noon", "output": "2021-03-05T12:00:00"},
            {"messages": [{"role": "user", "content": "when"}, {"role": "assistant", "content": "1999-12-31"}]}]
    path = tmp_path / ("d.jsonl" if form == "lines" else "d.json")
    path.write_text("\n".join(json.dumps(r) for r in rows) if form == "lines" else json.dumps(rows))
    loaded = list(data.iter_examples(data.load_dataset_files(path, cache_dir=tmp_path / "cache")))
    assert [r.get("output") for r in loaded] == ["2021-03-05", "2021-03-05T12:00:00", None]
    assert loaded[2]["messages"][1]["content"] == "1999-12-31"
