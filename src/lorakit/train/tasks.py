"""The order-extraction task: the dataset lorakit's demo trains on, made by this code.

This module owns the demo task end to end except the model: generating
examples, splitting them, writing them as Alpaca JSON Lines, and scoring what
a model answers.

The task turns one English sentence about a customer order into a fixed JSON
record::

    "Maria Lopez, 34, from Denver, ordered 3 blue lamps on Friday."
    -> {"name": "Maria Lopez", "age": 34, "city": "Denver", "item": "lamp",
        "quantity": 3, "color": "blue", "day": "Friday"}

The sentences come from varied templates (the order of the facts changes,
quantities are sometimes written as words or "a", items are plural or not),
so a model has to read the sentence rather than copy a pattern. Everything is
deterministic from a seed. A base instruction model prompted with the same
instruction scores close to 0% exact match (it invents keys, keeps "lamps"
plural, quotes numbers, writes prose around the JSON); a short LoRA run
teaches it the format.

Scoring is exact match on canonical JSON: the first JSON object in the
model's output is parsed and compared, keys and value types included, with
the expected record. An output without a parseable object scores 0.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TASK_NAME = "order-extraction"

#: The instruction every example carries; the same text is used at inference.
INSTRUCTION = (
    "Extract the order as JSON with the keys name, age, city, item, quantity, color, day."
)

#: The keys of a record, in the order they are written.
FIELDS = ("name", "age", "city", "item", "quantity", "color", "day")

# --------------------------------------------------------------------------
# Vocabulary. Items map singular -> plural (the record uses the singular).
# --------------------------------------------------------------------------

_FIRST_NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olivia", "Diego", "Hannah", "Kenji",
    "Fatima", "Lucas", "Priya", "Noah", "Elena", "Omar", "Sofia", "Liam",
    "Yuki", "Mateo", "Grace", "Ivan", "Zara", "Ethan", "Amara", "Felix",
    "Leila", "Samuel", "Nina", "Tomas", "Chloe", "Rafael",
)
_LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Wang", "Brown", "Garcia", "Muller", "Tanaka",
    "Ali", "Martin", "Patel", "Johnson", "Rossi", "Haddad", "Novak", "Kim",
    "Silva", "Dubois", "Okafor", "Petrov", "Nguyen", "Cohen", "Larsen", "Reyes",
    "Schmidt", "Moreau", "Costa", "Evans", "Sato", "Walker",
)
_CITIES = (
    "Denver", "Boston", "Chicago", "Seattle", "Austin", "Miami", "Portland",
    "Atlanta", "Phoenix", "Dallas", "Houston", "Detroit", "Toronto", "London",
    "Paris", "Berlin", "Madrid", "Rome", "Dublin", "Oslo", "Vienna", "Lisbon",
    "Sydney", "Tokyo", "Seoul", "Mumbai", "Cairo", "Nairobi", "Lima", "Quito",
)
_ITEMS = {
    "lamp": "lamps", "chair": "chairs", "table": "tables", "mug": "mugs",
    "towel": "towels", "pillow": "pillows", "blanket": "blankets",
    "backpack": "backpacks", "umbrella": "umbrellas", "bottle": "bottles",
    "candle": "candles", "basket": "baskets", "jacket": "jackets",
    "scarf": "scarves", "knife": "knives", "glass": "glasses",
    "bench": "benches", "box": "boxes", "shelf": "shelves", "rug": "rugs",
}
_COLORS = (
    "red", "blue", "green", "black", "white", "yellow", "gray", "orange",
    "purple", "pink", "brown",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_MIN_AGE, _MAX_AGE = 18, 79
_MAX_QUANTITY = 12

# Sentence templates. {goods} is e.g. "3 blue lamps" / "a blue lamp";
# {Goods} is the same with a capital first letter; {were} agrees with it.
_TEMPLATES = (
    "{name}, {age}, from {city}, ordered {goods} on {day}.",
    "On {day}, {name} ({age}) from {city} bought {goods}.",
    "{name} is {age} and lives in {city}. On {day} they ordered {goods}.",
    "A {age}-year-old customer from {city}, {name}, purchased {goods} on {day}.",
    "{Goods} {were} ordered by {name} ({age}, {city}) on {day}.",
    "Order from {city}: {name}, age {age}, wants {goods}, placed on {day}.",
    "{day}: {name} of {city}, aged {age}, picked up {goods}.",
    "{name} ({age}) ordered {goods} from our {city} store on {day}.",
    "Ship {goods} to {name}, {age}, in {city} by {day}.",
    "{name} from {city} (age {age}) asked on {day} for {goods}.",
)


@dataclass(frozen=True)
class Order:
    """One order: the structured record a sentence is generated from.

    Attributes:
        name: Full name, "First Last".
        age: Customer age in years.
        city: City name.
        item: The item, singular ("lamp").
        quantity: How many items (1 to 12).
        color: Item colour, lower case.
        day: Weekday, capitalised.
    """

    name: str
    age: int
    city: str
    item: str
    quantity: int
    color: str
    day: str

    def to_record(self) -> dict:
        """The expected output as a dict, keys in `FIELDS` order."""
        return {key: getattr(self, key) for key in FIELDS}

    def to_json(self) -> str:
        """The expected output text: `json.dumps` of `to_record()`."""
        return json.dumps(self.to_record())


def _random_order(rng: random.Random) -> Order:
    return Order(
        name=f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
        age=rng.randint(_MIN_AGE, _MAX_AGE),
        city=rng.choice(_CITIES),
        item=rng.choice(sorted(_ITEMS)),
        quantity=rng.randint(1, _MAX_QUANTITY),
        color=rng.choice(_COLORS),
        day=rng.choice(_DAYS),
    )


def _goods_phrase(order: Order, rng: random.Random) -> str:
    """"3 blue lamps", "three blue lamps", "a blue lamp" or "one blue lamp"."""
    if order.quantity == 1:
        count = rng.choice(("a", "one", "1"))
        return f"{count} {order.color} {order.item}"
    plural = _ITEMS[order.item]
    word = _NUMBER_WORDS.get(order.quantity)
    count = word if word is not None and rng.random() < 0.4 else str(order.quantity)
    return f"{count} {order.color} {plural}"


def render_sentence(order: Order, rng: random.Random) -> str:
    """Write `order` as an English sentence with a random template.

    Args:
        order: The order to describe.
        rng: Source of the template and wording choices.

    Returns:
        One sentence (or two short ones) mentioning every field.
    """
    goods = _goods_phrase(order, rng)
    template = rng.choice(_TEMPLATES)
    return template.format(
        name=order.name,
        age=order.age,
        city=order.city,
        day=order.day,
        goods=goods,
        Goods=goods[0].upper() + goods[1:],
        were="was" if order.quantity == 1 else "were",
    )


def make_example(order: Order, rng: random.Random) -> dict:
    """One Alpaca record for `order`.

    Returns:
        ``{"instruction": INSTRUCTION, "input": sentence, "output": json}``.
    """
    return {
        "instruction": INSTRUCTION,
        "input": render_sentence(order, rng),
        "output": order.to_json(),
    }


def generate_examples(n: int, seed: int = 0) -> list[dict]:
    """Generate `n` distinct Alpaca examples, deterministically from `seed`.

    No two examples share a sentence or an expected record.

    Args:
        n: Number of examples.
        seed: Random seed; the same (n, seed) always gives the same list, and
            a smaller n gives a prefix of a larger one.

    Returns:
        A list of `n` Alpaca records (see `make_example`).

    Raises:
        ValueError: If n is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    examples: list[dict] = []
    seen: set[str] = set()
    while len(examples) < n:
        example = make_example(_random_order(rng), rng)
        keys = (example["input"], example["output"])
        if keys[0] in seen or keys[1] in seen:
            continue
        seen.update(keys)
        examples.append(example)
    return examples


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples with no overlap.

    The held-out set is the first `n_eval` generated examples, so it does not
    change when `n_train` does; no sentence or expected record appears in
    both sets.

    Args:
        n_train: Number of training examples.
        n_eval: Number of held-out examples.
        seed: Random seed.

    Returns:
        (train, held_out), lists of Alpaca records.
    """
    examples = generate_examples(n_eval + n_train, seed)
    return examples[n_eval:], examples[:n_eval]


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSON Lines (UTF-8, one object per line).

    Args:
        records: JSON-serialisable dicts.
        path: Destination file; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_splits(
    out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0
) -> tuple[Path, Path]:
    """Generate the splits and write ``train.jsonl`` and ``eval.jsonl``.

    Args:
        out_dir: Folder to write into (created if needed).
        n_train: Number of training examples.
        n_eval: Number of held-out examples.
        seed: Random seed.

    Returns:
        (train_path, eval_path).
    """
    train, held_out = make_splits(n_train, n_eval, seed)
    out_dir = Path(out_dir)
    return write_jsonl(train, out_dir / "train.jsonl"), write_jsonl(held_out, out_dir / "eval.jsonl")


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


def parse_prediction(text: str) -> dict | None:
    """The first JSON object in a model's output, or None.

    Text before the first ``{`` and after the object is ignored (so prose or a
    code fence around the JSON does not matter); the object itself must be
    valid JSON.

    Args:
        text: The generated text.

    Returns:
        The parsed object, or None if there is no valid JSON object.
    """
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def canonical_json(record: dict) -> str:
    """A record as canonical JSON text: sorted keys, no extra whitespace."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def exact_match(prediction: str, target: str | dict) -> bool:
    """Whether a model output matches the expected record exactly.

    Args:
        prediction: The generated text.
        target: The expected record, as a dict or as JSON text.

    Returns:
        True if the output's first JSON object equals the target, keys and
        value types included (``"34"`` is not ``34``).
    """
    parsed = parse_prediction(prediction)
    if parsed is None:
        return False
    if isinstance(target, str):
        target = json.loads(target)
    return canonical_json(parsed) == canonical_json(target)


@dataclass
class Score:
    """The result of scoring a list of predictions.

    Attributes:
        n: Number of predictions scored.
        correct: Number that match exactly.
        parsed: Number that contain a JSON object at all.
        field_accuracy: For each key in `FIELDS`, the fraction of predictions
            whose parsed object has that key with the expected value.
    """

    n: int
    correct: int
    parsed: int
    field_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def exact_match(self) -> float:
        """Fraction of predictions that match exactly (0.0 when n is 0)."""
        return self.correct / self.n if self.n else 0.0

    def summary(self) -> str:
        """One line, e.g. ``exact match 83.0% (83/100), 100 parsed``."""
        return f"exact match {100 * self.exact_match:.1f}% ({self.correct}/{self.n}), {self.parsed} parsed"


def score_predictions(predictions: Sequence[str], targets: Sequence[str | dict]) -> Score:
    """Score model outputs against expected records.

    Args:
        predictions: Generated texts, one per example.
        targets: Expected records (dicts or JSON text, e.g. the examples'
            ``output`` fields), aligned with `predictions`.

    Returns:
        A `Score`.

    Raises:
        ValueError: If the two sequences differ in length.
    """
    if len(predictions) != len(targets):
        raise ValueError(
            f"{len(predictions)} predictions for {len(targets)} targets; they must be aligned"
        )
    correct = parsed_count = 0
    field_hits = dict.fromkeys(FIELDS, 0)
    for prediction, target in zip(predictions, targets):
        expected = json.loads(target) if isinstance(target, str) else target
        parsed = parse_prediction(prediction)
        if parsed is None:
            continue
        parsed_count += 1
        correct += canonical_json(parsed) == canonical_json(expected)
        for key in FIELDS:
            if key in parsed and canonical_json({key: parsed[key]}) == canonical_json({key: expected.get(key)}):
                field_hits[key] += 1
    n = len(predictions)
    return Score(
        n=n,
        correct=correct,
        parsed=parsed_count,
        field_accuracy={key: (hits / n if n else 0.0) for key, hits in field_hits.items()},
    )
