"""Training data: files read through Hugging Face `datasets`, example shapes, tokenization with loss masks, batching.

This module owns everything between data files and a padded batch of tensors.
`load_data` reads one or more files or globs through `datasets`: ``.jsonl`` and
``.json`` (JSON Lines or one JSON array), ``.parquet``, ``.csv`` and folders
written by ``datasets.Dataset.save_to_disk``. Files may be mixed as long as a
column has the same form in each (strings, or lists of messages). Each row is one
example in one of these shapes (columns that are null or absent in a row do not
count; columns of no shape are dropped):

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``.
  The loss covers the output (plus EOS) only.
* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with
  the tokenizer's chat template. The loss covers the assistant turns only.
* text: ``{"text": str}``. The loss covers every token.
* prompt/completion (TRL's shape), plain ``{"prompt": str, "completion": str}``
  or conversational ``{"prompt": [messages], "completion": [messages]}``. The
  loss covers the completion (plus EOS) only.

A field mapping (``{"instruction": "question", "output": "answer"}``; on the
command line ``--data-field instruction=question``) renames a file's columns
onto these fields first.

Memory: a file becomes a memory-mapped Arrow table in the `datasets` cache (its
default), so a large file is never held in Python lists; rows are validated and
tokenized in batches of Arrow rows, and only the token ids (what training
indexes) are materialised. A JSON *array* file is parsed whole by `datasets`
before it is written to Arrow: use JSON Lines for large data.

Prompt tokens carry the label -100 (ignored by the loss). Prompts are rendered
and encoded by `lorakit.prompts` (`render_prompt`, `encode_prompt`), which
generation, evaluation and the server use too, so the model sees at inference
exactly the prompt it was trained on.

A malformed row raises `DataError`, naming the file, the 1-based line number
(JSON Lines) or row number (other files) and the problem.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..prompts import encode_prompt, render_prompt, require_chat_template

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)

ALPACA, CHAT, TEXT = "alpaca", "chat", "text"
PROMPT_COMPLETION = "prompt_completion"  # TRL's plain form: two strings
CHAT_PROMPT_COMPLETION = "chat_prompt_completion"  # TRL's conversational form: two lists of messages
CHAT_ROLES = ("system", "user", "assistant", "tool")

#: The fields a column can be mapped onto (``--data-field FIELD=column``).
FIELDS = ("instruction", "input", "output", "messages", "text", "prompt", "completion")
_STRING_FIELDS = ("instruction", "input", "output", "text")

#: A validation split smaller than this is warned about: its loss is too noisy to compare runs by.
MIN_VALIDATION_EXAMPLES = 20

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_BATCH_ROWS = 1024  # Arrow rows turned into Python dicts at a time


class DataError(ValueError):
    """A data file or one of its lines is malformed.

    Attributes:
        path: The file (or the pattern that matched nothing).
        line: The 1-based line (JSON Lines) or row number, or None for a problem
            with the whole file.
        problem: What is wrong.
        unit: ``"line"`` or ``"row"``: what `line` counts.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str, *, unit: str = "line"):
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.unit = unit
        where = f"{self.path}, {unit} {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


# --------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def example_shape(example: dict) -> str:
    """Which shape an example has, checking its fields.

    Args:
        example: One parsed JSON object (a key with the value None counts as
            present: `iter_examples` drops a row's null columns first).

    Returns:
        ``"alpaca"``, ``"chat"``, ``"text"``, ``"prompt_completion"`` (two
        strings) or ``"chat_prompt_completion"`` (two lists of messages).

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
    if "prompt" in example or "completion" in example:
        shapes.append(PROMPT_COMPLETION)
    if not shapes:
        raise ValueError(
            f"unknown example shape, columns {sorted(example)}: expected 'instruction' and "
            f"'output' (Alpaca), 'messages' (chat), 'text', or 'prompt' and 'completion'"
        )
    if len(shapes) > 1:
        raise ValueError(f"ambiguous example: it has the keys of more than one shape ({', '.join(shapes)})")
    shape = shapes[0]
    if shape == ALPACA:
        _check_alpaca(example)
    elif shape == CHAT:
        _check_messages(example["messages"], "messages")
        if not any(message["role"] == "assistant" for message in example["messages"]):
            raise ValueError("no assistant message: a chat example needs at least one to learn from")
    elif shape == TEXT:
        if not isinstance(example["text"], str) or not example["text"]:
            raise ValueError(f"field 'text' must be a non-empty string, got {_type_name(example['text'])}")
    else:
        shape = _check_prompt_completion(example)
    return shape


def _check_alpaca(example: dict) -> None:
    for key in ("instruction", "output"):
        if key not in example:
            raise ValueError(f"missing field {key!r} (Alpaca examples need 'instruction' and 'output')")
        if not isinstance(example[key], str):
            raise ValueError(f"field {key!r} must be a string, got {_type_name(example[key])}")
    if example.get("input") is not None and not isinstance(example["input"], str):
        raise ValueError(f"field 'input' must be a string, got {_type_name(example['input'])}")


def _check_messages(messages, field: str) -> None:
    """Check a list of {role, content} messages; `field` names it in messages ("messages", "prompt", ...)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {field!r} must be a non-empty list, got {_type_name(messages)}")
    where = "message" if field == "messages" else f"{field} message"
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(f"{where} {number} must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where} {number} is missing field {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"{where} {number} field {key!r} must be a string, got {_type_name(message[key])}"
                )
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"{where} {number} has unknown role {message['role']!r} (expected one of {', '.join(CHAT_ROLES)})"
            )


def _check_prompt_completion(example: dict) -> str:
    for key in ("prompt", "completion"):
        if key not in example:
            raise ValueError(f"missing field {key!r} (prompt/completion examples need both)")
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ValueError("field 'completion' must be a non-empty string")
        return PROMPT_COMPLETION
    if isinstance(prompt, list) and isinstance(completion, list):
        _check_messages(prompt, "prompt")
        _check_messages(completion, "completion")
        return CHAT_PROMPT_COMPLETION
    raise ValueError(
        "fields 'prompt' and 'completion' must both be strings or both lists of messages, got "
        f"{_type_name(prompt)} and {_type_name(completion)}"
    )


def _without_nulls(value):
    """A row as `datasets` gives it, less every null: a column (or message key) that is None is absent."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


# --------------------------------------------------------------------------
# Field mapping
# --------------------------------------------------------------------------


def parse_field_mapping(items: Iterable[str]) -> dict[str, str]:
    """Parse ``FIELD=column`` strings (the ``--data-field`` flag) into a field mapping.

    Args:
        items: E.g. ``["instruction=question", "output=answer"]``.

    Returns:
        ``{"instruction": "question", "output": "answer"}``, checked as
        `column_renames` checks it.

    Raises:
        ValueError: If an item is not ``FIELD=column``, or the mapping is invalid.
    """
    mapping: dict[str, str] = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(f"a data field mapping is FIELD=column, got {item!r}")
        if field.strip() in mapping:
            raise ValueError(f"data field {field.strip()!r} is mapped twice")
        mapping[field.strip()] = column.strip()
    column_renames(mapping)
    return mapping


def column_renames(fields: Mapping[str, str] | None) -> dict[str, str]:
    """The column renames a field mapping asks for.

    Args:
        fields: lorakit field -> column name in the data, e.g. ``{"text": "body"}``.

    Returns:
        column name -> lorakit field, for the columns whose name changes.

    Raises:
        ValueError: If a field is not one of `FIELDS`, or two fields name one column.
    """
    fields = dict(fields or {})
    for field in fields:
        if field not in FIELDS:
            raise ValueError(f"unknown data field {field!r}: expected one of {', '.join(FIELDS)}")
    if len(set(fields.values())) < len(fields):
        raise ValueError(f"a column is mapped onto more than one field: {fields}")
    return {column: field for field, column in fields.items() if column != field}


def _rename_example(example: dict, renames: Mapping[str, str]) -> dict:
    for column, field in renames.items():
        if column in example:
            if field in example:
                raise ValueError(f"has both column {column!r} (mapped onto {field!r}) and a column {field!r}")
            example[field] = example.pop(column)
    return example


# --------------------------------------------------------------------------
# Reading JSON Lines strictly (line numbers), and files through `datasets`
# --------------------------------------------------------------------------


def _jsonl_examples(path: Path, renames: Mapping[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, example) for each non-blank line, each validated; holds one line at a time.

    Raises:
        DataError: At the first line that is not UTF-8, not JSON or not a valid example.
    """
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
                if renames and isinstance(example, dict):
                    _rename_example(example, renames)
                example_shape(example)
            except ValueError as error:
                raise DataError(path, number, str(error)) from None
            yield number, example


def read_jsonl(path: str | Path, *, fields: Mapping[str, str] | None = None) -> list[dict]:
    """Read and validate a JSON Lines file of examples into a list (small files; see `load_data`).

    Blank lines are skipped. Shapes may be mixed within a file.

    Args:
        path: The ``.jsonl`` file.
        fields: Field mapping (see `column_renames`).

    Returns:
        The examples, as parsed dicts (columns renamed), in file order.

    Raises:
        DataError: If the file is missing, not UTF-8, empty, or a line is not
            a valid example (bad JSON, unknown shape, missing field, wrong type).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    examples = [example for _, example in _jsonl_examples(path, column_renames(fields))]
    if not examples:
        raise DataError(path, None, "empty file: no examples")
    return examples


def resolve_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The data files named by paths and globs (``data/*.jsonl``, ``data/**/*.parquet``), in order.

    A glob's matches are sorted; a path that is not a glob is kept as given
    (checked when it is read).

    Raises:
        DataError: If a glob matches nothing.
        ValueError: If no path is given.
    """
    import glob

    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for item in paths:
        text = str(item)
        if any(char in text for char in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(text, None, "no file matches this pattern")
            found += [Path(match) for match in matches]
        else:
            found.append(Path(text))
    if not found:
        raise ValueError("no data file given")
    return found


def _starts_with(path: Path, char: bytes) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == char


def _read_file(path: Path, renames: Mapping[str, str], cache_dir: str | None) -> Dataset:
    """One file or save_to_disk folder as a memory-mapped `datasets.Dataset` (columns as in the file)."""
    import datasets

    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise DataError(path, None, "a folder, but not one written by datasets' save_to_disk")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(path, None, f"a DatasetDict without a 'train' split (it has {', '.join(loaded)}); "
                                            "give the folder of the split to use")
            loaded = loaded["train"]
        return loaded
    if not path.is_file():
        raise DataError(path, None, "file not found")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(path, None, f"unsupported file type {path.suffix!r}: expected .jsonl, .json, .parquet, "
                                    ".csv or a folder written by datasets' save_to_disk")
    options: dict = {}
    if builder == "json":
        options["parse_agent_traces"] = False
    elif builder == "csv":
        # Every CSV cell is text: a column of digits stays a string column.
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise DataError(path, None, "empty file: no examples")
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **options)
        if builder == "json":
            dataset = _read_json_as_written(path, dataset.data.schema, cache_dir) or dataset
        return dataset
    except DataError:
        raise
    except Exception as error:  # datasets wraps the parser's error in its own (DatasetGenerationError, ValueError)
        # JSON Lines: read strictly, which raises at the first bad line with its number.
        json_lines = builder == "json" and not _starts_with(path, b"[")
        if json_lines and sum(1 for _ in _jsonl_examples(path, renames)) == 0:
            raise DataError(path, None, "empty file: no examples") from None
        cause = error.__cause__ or error
        raise DataError(path, None, f"cannot be read as {builder}: {cause}") from error


def _as_text(kind):
    """`kind` with every date, time or timestamp type inside it (struct fields, list items) made string."""
    import pyarrow as pa

    if pa.types.is_temporal(kind):
        return pa.string()
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_as_text(field.type)) for field in kind])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_as_text(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_as_text(kind.value_type)))
    return kind


def _read_json_as_written(path: Path, schema, cache_dir: str | None) -> Dataset | None:
    """A JSON (Lines) file whose strings Arrow read as dates or timestamps, re-read as written.

    Arrow's JSON reader infers dates and timestamps from strings that look like them, and
    turning those back into text changes them ("2021-03-05T10:00" -> "2021-03-05 10:00:00");
    a training target must stay byte for byte as written. Here Python's json module reads the
    rows into the same columns with those types made string, one row at a time for JSON Lines,
    to a memory-mapped Arrow file in datasets' cache. None when no column needs it.
    """
    import datasets
    import pyarrow as pa

    text = pa.schema([field.with_type(_as_text(field.type)) for field in schema])
    if text == schema:
        return None
    stat = path.stat()
    return datasets.Dataset.from_generator(
        _json_rows, features=datasets.Features.from_arrow_schema(text), cache_dir=cache_dir,
        gen_kwargs={"path": str(path), "columns": tuple(text.names),  # a list would be split into shards
                    "version": (stat.st_mtime_ns, stat.st_size)})


def _json_rows(path: str, columns: tuple[str, ...], version: tuple[int, int]) -> Iterator[dict]:
    """Each row of a JSON array or JSON Lines file, every column present (`version` only keys datasets' cache)."""
    source = Path(path)
    if _starts_with(source, b"["):
        with source.open(encoding="utf-8") as handle:
            rows: Iterable = json.load(handle)
    else:
        rows = (json.loads(raw) for raw in source.open("rb") if raw.strip())
    for row in rows:
        yield {name: row.get(name) for name in columns}


def _line_of_row(path: Path, row: int) -> tuple[int, str] | None:
    """The line number and text of the `row`-th non-blank line of a JSON Lines file (1-based)."""
    seen = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return number, raw.decode("utf-8", errors="replace")
    return None


def _row_error(path: Path, row: int, problem: str, nulls: list[str], renames: Mapping[str, str],
               unmapped: list[str]) -> DataError:
    """The error for a bad row: for JSON Lines, at its line, with the strict check's message if it fails there."""
    hint = (f" (the field mapping's column(s) {', '.join(map(repr, unmapped))} are not in this file)"
            if unmapped else "")
    if path.suffix.lower() in (".jsonl", ".json") and path.is_file() and not _starts_with(path, b"["):
        found = _line_of_row(path, row)
        if found is not None:
            number, line = found
            try:
                example = json.loads(line)
                if isinstance(example, dict):
                    _rename_example(example, renames)
                example_shape(example)
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                problem = str(error)
            return DataError(path, number, problem + hint)
    if nulls:
        problem += f" (null columns: {', '.join(nulls)})"
    return DataError(path, row, problem + hint, unit="row")


def _validate_rows(dataset: Dataset, path: Path, renames: Mapping[str, str], unmapped: list[str]) -> None:
    """Check every row's shape, `_BATCH_ROWS` rows at a time (the dataset stays in Arrow)."""
    columns = dataset.column_names
    row = 0
    batches = dataset.iter(batch_size=_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except UnicodeDecodeError as error:  # Arrow's JSON reader leaves strings unchecked
            if path.suffix.lower() in (".jsonl", ".json") and path.is_file():
                for _ in _jsonl_examples(path, renames):  # raises at the line
                    pass
            raise DataError(path, None, f"not valid UTF-8 ({error.reason})") from None
        if batch is None:
            return
        for values in zip(*(batch[column] for column in columns)):
            row += 1
            example = _without_nulls(dict(zip(columns, values)))
            try:
                example_shape(example)
            except ValueError as error:
                nulls = [column for column, value in zip(columns, values) if value is None]
                raise _row_error(path, row, str(error), nulls, renames, unmapped) from None


def _canonical_columns(dataset: Dataset, path: Path, cache_dir: str | None) -> Dataset:
    """Keep the shape columns that hold a value somewhere, in one form per kind of column.

    Strings become ``string`` (CSV gives ``large_string``); lists of message
    structs become lists of `datasets.Json` (message keys may differ between
    files), so files of one shape concatenate. A cast is written to the cache
    folder, never beside the data (`datasets` would write it into a
    save_to_disk folder).
    """
    import hashlib

    import datasets

    table = dataset.data
    keep = [name for name in dataset.column_names
            if name in FIELDS and table.column(name).null_count < len(table)]
    dataset = dataset.select_columns(keep)
    features = dataset.features.copy()
    for name, feature in features.items():
        if isinstance(feature, datasets.Value) and feature.dtype in ("large_string", "string"):
            features[name] = datasets.Value("string")
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, dict):
            features[name] = datasets.List(datasets.Json())
    if features == dataset.features:
        return dataset
    stat = path.stat()
    sources = sorted(f["filename"] for f in dataset.cache_files)
    key = hashlib.sha256(repr((str(path.resolve()), stat.st_mtime_ns, stat.st_size, sources, keep,
                               str(features))).encode()).hexdigest()[:16]
    folder = Path(cache_dir if cache_dir is not None else datasets.config.HF_DATASETS_CACHE) / "lorakit-cast"
    folder.mkdir(parents=True, exist_ok=True)
    return dataset.cast(features, cache_file_name=str(folder / f"{key}.arrow"))


def _form(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return "strings"
    if isinstance(feature, datasets.List):
        return "lists of messages"
    return "a mix of strings and lists" if isinstance(feature, datasets.Json) else str(feature)


def load_dataset_files(
    paths: str | Path | Sequence[str | Path],
    *,
    fields: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Read, validate and concatenate data files through `datasets`.

    Args:
        paths: One or more files, save_to_disk folders or globs (see
            `resolve_paths`): ``.jsonl``/``.json`` (JSON Lines or one array),
            ``.parquet``, ``.csv``.
        fields: Field mapping, lorakit field -> column, e.g. ``{"text": "body"}``
            (see `column_renames`); applied to every file that has the column.
        cache_dir: Where `datasets` writes its Arrow files; its default cache
            (``~/.cache/huggingface/datasets``) when None.

    Returns:
        A memory-mapped `datasets.Dataset` of N rows whose columns are the
        shape fields found (``instruction``, ``messages``, ``prompt``, ...);
        a column absent from a row is None there (`iter_examples` drops it).

    Raises:
        DataError: If a file is missing, unreadable or empty, a glob matches
            nothing, a row has no valid shape (file, line or row, problem), a
            file has both a mapped column and the column it is mapped onto, or
            two files give one column different forms.
        ValueError: If the mapping is invalid or names a column no file has.
    """
    import datasets

    renames = column_renames(fields)
    cache = str(cache_dir) if cache_dir is not None else None
    parts: list[tuple[Path, Dataset]] = []
    mapped_seen: set[str] = set()
    for path in resolve_paths(paths):
        dataset = _read_file(path, renames, cache)
        if len(dataset) == 0:
            raise DataError(path, None, "empty file: no examples")
        present = {column: field for column, field in renames.items() if column in dataset.column_names}
        for column, field in present.items():
            if field in dataset.column_names:
                raise DataError(path, None, f"has both column {column!r} (mapped onto {field!r}) and a column {field!r}")
        mapped_seen |= set(present)
        if present:
            dataset = dataset.rename_columns(present)
        _validate_rows(dataset, path, renames, [column for column in renames if column not in present])
        parts.append((path, _canonical_columns(dataset, path, cache)))
    if missing := [column for column in renames if column not in mapped_seen]:
        raise ValueError(f"no data file has the mapped column(s) {', '.join(map(repr, missing))}")
    first_seen: dict[str, tuple[Path, object]] = {}
    for path, dataset in parts:
        for name, feature in dataset.features.items():
            if name in first_seen and first_seen[name][1] != feature:
                other, other_feature = first_seen[name]
                raise DataError(path, None, f"column {name!r} holds {_form(feature)} here but {_form(other_feature)} "
                                            f"in {other}: files can be mixed only where each column has one form")
            first_seen.setdefault(name, (path, feature))
    if len(parts) == 1:
        return parts[0][1]
    return datasets.concatenate_datasets([dataset for _, dataset in parts])


def iter_examples(examples: Dataset | Iterable[dict]) -> Iterator[dict]:
    """The examples of a loaded dataset as dicts, less the columns that are null in each row.

    Args:
        examples: A `datasets.Dataset` from `load_data` / `load_dataset_files`
            (read `_BATCH_ROWS` rows at a time), or any iterable of example dicts
            (yielded as they are).

    Yields:
        One example dict per row, e.g. ``{"instruction": ..., "output": ...}``.
    """
    import datasets

    if not isinstance(examples, datasets.Dataset):
        yield from examples
        return
    columns = examples.column_names
    for batch in examples.iter(batch_size=_BATCH_ROWS):
        for values in zip(*(batch[column] for column in columns)):
            yield _without_nulls(dict(zip(columns, values)))


# --------------------------------------------------------------------------
# Validation splits
# --------------------------------------------------------------------------


def _held_out(n: int, fraction: float, seed: int) -> set[int]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return set()
    if n < 2:
        raise ValueError(f"cannot hold out a validation split from {n} example(s)")
    n_val = min(max(1, round(n * fraction)), n - 1)
    return set(random.Random(seed).sample(range(n), n_val))


def split_validation(
    examples: Sequence[dict], fraction: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Hold out a random fraction of the examples for validation.

    Args:
        examples: All examples.
        fraction: Share held out, in [0, 1). At least one example is held out
            when it is positive, and at least one kept for training.
        seed: Seed of the random choice; the same seed gives the same split
            (and the same rows as `split_dataset` on the same data).

    Returns:
        (train, validation), each in the original order.

    Raises:
        ValueError: If `fraction` is outside [0, 1), or positive with fewer
            than two examples.
    """
    held = _held_out(len(examples), fraction, seed)
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [ex for i, ex in enumerate(examples) if i in held]
    return train, val


def split_dataset(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """`split_validation` for a `datasets.Dataset`: the same rows held out, no row copied.

    Returns:
        (train, validation) as index views (``Dataset.select``) of `dataset`,
        each in the original order; validation has 0 rows when `fraction` is 0.

    Raises:
        ValueError: As `split_validation`.
    """
    held = _held_out(len(dataset), fraction, seed)
    if not held:
        return dataset, dataset.select([])
    train = [i for i in range(len(dataset)) if i not in held]
    return dataset.select(train), dataset.select(sorted(held))


def _warn_if_small(n_val: int) -> None:
    if 0 < n_val < MIN_VALIDATION_EXAMPLES:
        logger.warning(
            "the validation split has only %d example(s), fewer than %d: its loss is too noisy to "
            "compare runs or checkpoints by", n_val, MIN_VALIDATION_EXAMPLES,
        )


def load_data(
    train: str | Path | Sequence[str | Path],
    *,
    val: str | Path | Sequence[str | Path] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    fields: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, Dataset]:
    """Read training data and a validation split as memory-mapped `datasets.Dataset`s.

    What the trainer calls for ``--data`` (one or more paths or globs),
    ``--val-data``, ``--val-fraction`` and ``--data-field FIELD=column``
    (`parse_field_mapping` turns those into `fields`). Tokenize the result with
    `tokenize_examples`. A validation split of 1 to 19 examples logs a warning.

    Args:
        train: Training files, folders or globs (see `load_dataset_files`).
        val: Validation files, folders or globs, or None.
        val_fraction: Without `val`, the share of the training rows to hold out
            (see `split_validation`). Defaults to 0 (no validation).
        seed: Seed of the held-out choice.
        fields: Field mapping, applied to training and validation files.
        cache_dir: `datasets`' cache folder (its default when None).

    Returns:
        (train, validation); validation may have 0 rows.

    Raises:
        DataError: If a file is malformed (see `load_dataset_files`).
        ValueError: If both `val` and a positive `val_fraction` are given, or
            the mapping is invalid.
    """
    train_set = load_dataset_files(train, fields=fields, cache_dir=cache_dir)
    if val is not None:
        if val_fraction:
            raise ValueError("give either a validation file or a validation fraction, not both")
        val_set = load_dataset_files(val, fields=fields, cache_dir=cache_dir)
    else:
        train_set, val_set = split_dataset(train_set, val_fraction, seed)
    _warn_if_small(len(val_set))
    return train_set, val_set


def load_splits(
    train_path: str | Path | Sequence[str | Path],
    val_path: str | Path | Sequence[str | Path] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    *,
    fields: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[list[dict], list[dict]]:
    """`load_data`, with the examples as lists of dicts (kept for callers that index examples).

    Prefer `load_data` for large data: this holds every example in Python.

    Args:
        train_path: Training files, folders or globs.
        val_path: Validation files, folders or globs, or None.
        val_fraction: Without `val_path`, the share of the training data to
            hold out (see `split_validation`). Defaults to 0 (no validation).
        seed: Seed of the held-out choice.
        fields: Field mapping (see `load_data`).
        cache_dir: `datasets`' cache folder.

    Returns:
        (train, validation) example lists (null columns dropped); validation may be empty.

    Raises:
        DataError: If a file is malformed (see `load_dataset_files`).
        ValueError: If both `val_path` and a positive `val_fraction` are given.
    """
    train, val = load_data(train_path, val=val_path, val_fraction=val_fraction, seed=seed, fields=fields,
                           cache_dir=cache_dir)
    return list(iter_examples(train)), list(iter_examples(val))


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


def _completion_text(example: dict, tokenizer) -> str:
    """A conversational completion's text: what the template adds after the rendered prompt.

    The prompt is `render_prompt`'s (the prompt messages and the generation
    prompt); the completion is the rest of the whole conversation's rendering.
    """
    prompt = render_prompt(example, tokenizer)
    full = tokenizer.apply_chat_template(list(example["prompt"]) + list(example["completion"]), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template does not render the prompt messages as a prefix of the "
            "whole conversation, so the completion cannot be located for the loss mask"
        )
    return full[len(prompt):]


def tokenize_example(example: dict, tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels for one example.

    Alpaca: ``encode_prompt`` ids (label -100), then the output's ids and EOS
    (labelled with themselves). The prompt and the response are tokenized
    separately, as at inference, where the model continues the prompt ids.
    Chat: each assistant turn is labelled, everything else is -100; EOS is
    appended after the last assistant turn unless the template already put
    the EOS token there. Text: the tokenizer's ids (with its special tokens)
    and EOS, all labelled. Prompt/completion: ``encode_prompt`` ids (-100),
    then the completion's ids, labelled: a string completion is encoded as is
    and followed by EOS; a conversational one is the template's rendering after
    the prompt, followed by EOS unless it holds the EOS token already.

    Args:
        example: A validated example (see `example_shape`, `iter_examples`).
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_seq_len: Maximum length; longer sequences are cut on the right.

    Returns:
        ``{"input_ids": [T], "labels": [T]}`` with T <= max_seq_len; a label
        is the token id itself where the token carries loss, else -100.

    Raises:
        ValueError: If the example is malformed, the tokenizer has no EOS, or
            (chat, conversational prompt/completion) no usable chat template.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    shape = example_shape(example)
    eos = _eos_id(tokenizer)
    if shape in (ALPACA, PROMPT_COMPLETION, CHAT_PROMPT_COMPLETION):
        if shape == CHAT_PROMPT_COMPLETION:
            require_chat_template(tokenizer)
            text = _completion_text(example, tokenizer)
            response = _encode(tokenizer, text) + ([] if tokenizer.eos_token in text else [eos])
        else:
            response = _encode(tokenizer, example["output" if shape == ALPACA else "completion"]) + [eos]
        prompt = encode_prompt(example, tokenizer)
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


def tokenize_examples(
    examples: Dataset | Iterable[dict], tokenizer, max_seq_len: int
) -> list[dict[str, list[int]]]:
    """Tokenize examples, dropping those left with no labelled token.

    An example whose prompt fills `max_seq_len` has nothing to learn from; it
    is dropped with a logged warning giving the count.

    Args:
        examples: A `datasets.Dataset` from `load_data` (read in batches of
            rows, see `iter_examples`), or validated example dicts.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_seq_len: Maximum sequence length.

    Returns:
        A list of ``{"input_ids", "labels"}`` dicts (usable as a map-style
        dataset by ``torch.utils.data.DataLoader`` with `collate`, or packed by
        `lorakit.train.packing.pack_examples`).
    """
    total, kept = 0, []
    for example in iter_examples(examples):
        total += 1
        feature = tokenize_example(example, tokenizer, max_seq_len)
        if any(label != IGNORE_INDEX for label in feature["labels"]):
            kept.append(feature)
    if len(kept) < total:
        logger.warning(
            "dropped %d of %d examples whose prompt fills max_seq_len=%d (no response tokens left)",
            total - len(kept), total, max_seq_len,
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
