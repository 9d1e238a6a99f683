"""Tests for lorakit.train.tasks: the order-extraction demo task and its scorer."""

import json
import re

import pytest

from lorakit.train import data, tasks


def test_generation_is_deterministic_and_prefix_stable():
    assert tasks.generate_examples(50, seed=3) == tasks.generate_examples(50, seed=3)
    assert tasks.generate_examples(20, seed=3) == tasks.generate_examples(50, seed=3)[:20]
    assert tasks.generate_examples(20, seed=3) != tasks.generate_examples(20, seed=4)


def test_examples_are_alpaca_records_whose_sentence_holds_every_field():
    for example in tasks.generate_examples(300, seed=0):
        assert data.example_shape(example) == "alpaca"
        assert example["instruction"] == tasks.INSTRUCTION
        record = json.loads(example["output"])
        assert list(record) == list(tasks.FIELDS)
        assert isinstance(record["age"], int) and isinstance(record["quantity"], int)
        sentence = example["input"]
        for key in ("name", "city", "color", "day"):
            assert record[key] in sentence
        assert re.search(rf"\b{record['age']}\b", sentence)
        assert record["item"][:3] in sentence  # "knife" -> "knives"


def test_templates_and_quantity_wordings_vary():
    examples = tasks.generate_examples(400, seed=0)
    starts = {example["input"].split()[0] for example in examples}
    assert len(starts) > 30
    sentences = " ".join(example["input"] for example in examples)
    for phrase in (" a ", " one ", " three ", " were ordered by "):
        assert phrase in sentences


def test_splits_do_not_overlap():
    train, held_out = tasks.make_splits(500, 100, seed=0)
    assert len(train) == 500 and len(held_out) == 100
    assert not {e["input"] for e in train} & {e["input"] for e in held_out}
    assert not {e["output"] for e in train} & {e["output"] for e in held_out}
    # The held-out set does not depend on the training set's size.
    assert tasks.make_splits(50, 100, seed=0)[1] == held_out


def test_write_splits_round_trips_through_the_data_reader(tmp_path):
    train_path, eval_path = tasks.write_splits(tmp_path / "task", n_train=30, n_eval=10, seed=1)
    train, held_out = tasks.make_splits(30, 10, seed=1)
    assert data.read_jsonl(train_path) == train
    assert data.read_jsonl(eval_path) == held_out


def test_order_json_matches_the_documented_example():
    order = tasks.Order("Maria Lopez", 34, "Denver", "lamp", 3, "blue", "Friday")
    assert order.to_json() == (
        '{"name": "Maria Lopez", "age": 34, "city": "Denver", "item": "lamp", '
        '"quantity": 3, "color": "blue", "day": "Friday"}'
    )


TARGET = '{"name": "Maria Lopez", "age": 34, "city": "Denver", "item": "lamp", "quantity": 3, "color": "blue", "day": "Friday"}'


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (TARGET, True),
        (TARGET + "\n", True),
        ("```json\n" + json.dumps(json.loads(TARGET), indent=2) + "\n```", True),
        ("Here it is: " + json.dumps(dict(reversed(json.loads(TARGET).items()))), True),
        (TARGET.replace("34", '"34"'), False),
        (TARGET.replace('"lamp"', '"lamps"'), False),
        (TARGET.replace(', "day": "Friday"', ""), False),
        (TARGET.replace("}", ', "note": "x"}'), False),
        (TARGET[:-1], False),
        ("Maria Lopez ordered lamps.", False),
        ("", False),
        ("[1, 2]", False),
    ],
)
def test_exact_match(prediction, expected):
    assert tasks.exact_match(prediction, TARGET) is expected
    assert tasks.exact_match(prediction, json.loads(TARGET)) is expected


def test_parse_prediction_skips_a_broken_brace():
    assert tasks.parse_prediction('{oops} then {"a": 1}') == {"a": 1}
    assert tasks.parse_prediction("no json") is None


def test_score_predictions():
    target = json.loads(TARGET)
    wrong_item = dict(target, item="lamps")
    predictions = [TARGET, json.dumps(wrong_item), "not json", TARGET]
    score = tasks.score_predictions(predictions, [TARGET] * 4)
    assert (score.n, score.correct, score.parsed) == (4, 2, 3)
    assert score.exact_match == 0.5
    assert score.field_accuracy["item"] == 0.5
    assert score.field_accuracy["name"] == 0.75
    assert score.summary() == "exact match 50.0% (2/4), 3 parsed"
    assert tasks.score_predictions([], []).exact_match == 0.0
    with pytest.raises(ValueError, match="aligned"):
        tasks.score_predictions(["x"], [])
