"""Which training defaults learn: a grid of LoRA settings on three small tasks unlike the demo's.

Usage: python -m benchmarks.defaults_grid [--settings A,B,...] [--tasks dates,intent,past]
                                          [--steps 100] [--results runs/defaults_grid/results.jsonl]
                                          [--write-docs]

Three tasks, each generated here from a seed (no download), each scored by exact match of the
model's first answer line after fine-tuning the embedded SmolLM2-135M-Instruct:

    dates   format conversion: a date written in one of nine ways -> ISO 8601 ("2021-03-05")
    intent  classification: a customer-support message -> one of six labels ("refund")
    past    short rewrite: a present-tense sentence -> the same sentence in the past tense

Every setting trains with `lorakit.train.train` for --steps steps (batch 8, lora_dropout 0.05, the
trainer's other defaults), reloads the saved adapter onto a fresh base and scores 48
held-out examples with greedy decoding. Each finished (task, setting) is appended to --results at
once, so a killed grid resumes where it stopped. --write-docs writes the table to
docs/defaults.md. The grid varies one thing at a time around the chosen centre (all-linear, r=16,
lr 1e-3, 10 warm-up steps) plus the former defaults, because the full product of targets x ranks x
rates x warm-up (36 runs per task at about 4 minutes each) does not fit this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# --- the three tasks ----------------------------------------------------------------------------

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS_IN = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def date_example(rng: random.Random) -> dict:
    """A date in one of nine written forms -> YYYY-MM-DD."""
    year, month = rng.randint(1950, 2035), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN[month - 1])
    name, short = MONTHS[month - 1], MONTHS[month - 1][:3]
    forms = (f"{name} {day}, {year}", f"{day} {name} {year}", f"{short} {_ordinal(day)}, {year}",
             f"the {_ordinal(day)} of {name}, {year}", f"{year}, {name} {day}", f"{day:02d}.{month:02d}.{year}",
             f"{name} {_ordinal(day)} {year}", f"{short}. {day} {year}", f"{day}-{short}-{year}")
    return {"instruction": "Convert the date to ISO 8601 (YYYY-MM-DD).", "input": rng.choice(forms),
            "output": f"{year}-{month:02d}-{day:02d}"}


INTENTS = {
    "billing": ("I was charged twice for {thing} this month", "why is my invoice for {thing} higher than usual",
                "the payment for {thing} went through two times", "can you explain the fee on my last bill",
                "my card was billed {n} dollars more than the price of {thing}"),
    "shipping": ("where is my {thing}? it was supposed to arrive {when}", "the tracking for my {thing} has not moved",
                 "my {thing} was delivered to the wrong address", "how long does delivery of a {thing} take",
                 "the courier never showed up with my {thing} {when}"),
    "refund": ("I want my money back for the {thing}", "please return the {n} dollars I paid for the {thing}",
               "how do I get reimbursed for a broken {thing}", "I returned the {thing} {when}, where is my money",
               "can I get a refund on the {thing} I bought"),
    "technical": ("the {thing} keeps restarting when I turn it on", "my {thing} shows error {n} after the update",
                  "the app crashes whenever I connect the {thing}", "the {thing} will not pair with my phone",
                  "since {when} the {thing} screen stays black"),
    "account": ("I cannot log in to my account since {when}", "how do I change the email on my profile",
                "please reset my password, the link expired", "someone else may be using my account",
                "I want to update the phone number on my account"),
    "cancel": ("please cancel my order for the {thing}", "I no longer want the {thing}, stop the order",
               "end my subscription before {when}", "cancel the {thing} I ordered {when}",
               "I would like to close my plan for the {thing}"),
}
THINGS = ("headphones", "blender", "laptop", "lamp", "phone case", "router", "camera", "kettle", "smart watch", "desk")
WHENS = ("yesterday", "last Monday", "on Friday", "two days ago", "last week", "this morning", "next month")


def intent_example(rng: random.Random) -> dict:
    """A support message -> one of the INTENTS labels."""
    label = rng.choice(sorted(INTENTS))
    text = rng.choice(INTENTS[label]).format(thing=rng.choice(THINGS), when=rng.choice(WHENS), n=rng.randint(2, 99))
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + rng.choice((".", "!", "?", "", " please."))
    labels = ", ".join(sorted(INTENTS))
    return {"instruction": f"Classify the customer message. Answer with one label: {labels}.", "input": text,
            "output": label}


# present (3rd singular, plural) -> past
VERBS = (("buys", "buy", "bought"), ("reads", "read", "read"), ("opens", "open", "opened"), ("writes", "write", "wrote"),
         ("carries", "carry", "carried"), ("paints", "paint", "painted"), ("finds", "find", "found"),
         ("washes", "wash", "washed"), ("brings", "bring", "brought"), ("fixes", "fix", "fixed"),
         ("sells", "sell", "sold"), ("drops", "drop", "dropped"), ("takes", "take", "took"), ("cleans", "clean", "cleaned"),
         ("hides", "hide", "hid"), ("studies", "study", "studied"), ("throws", "throw", "threw"), ("plans", "plan", "planned"))
SINGULAR = ("Maria", "Tom", "The teacher", "My neighbour", "Aisha", "The old man", "Kenji", "Our manager")
PLURAL = ("The children", "My parents", "We", "They", "The students", "You", "The workers")
OBJECTS = ("the window", "a letter", "three books", "the old car", "her keys", "a red box", "the garden", "two maps",
           "the kitchen floor", "a new lamp")
PLACES = ("", " in the morning", " at the market", " after lunch", " near the station", " with great care")


def past_example(rng: random.Random) -> dict:
    """A present-tense sentence -> the same sentence in the past tense."""
    third, plural, past = rng.choice(VERBS)
    if rng.random() < 0.5:
        subject, verb = rng.choice(SINGULAR), third
    else:
        subject, verb = rng.choice(PLURAL), plural
    tail = f"{rng.choice(OBJECTS)}{rng.choice(PLACES)}."
    return {"instruction": "Rewrite the sentence in the past tense.", "input": f"{subject} {verb} {tail}",
            "output": f"{subject} {past} {tail}"}


TASKS = {"dates": date_example, "intent": intent_example, "past": past_example}


def make_task(name: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples; no held-out input also appears in training."""
    rng = random.Random(f"{name}-{seed}")
    held_out: dict[str, dict] = {}
    while len(held_out) < n_eval:
        example = TASKS[name](rng)
        held_out.setdefault(example["input"], example)
    train = []
    while len(train) < n_train:
        example = TASKS[name](rng)
        if example["input"] not in held_out:
            train.append(example)
    return train, list(held_out.values())


def exact(prediction: str, target: str) -> bool:
    lines = prediction.strip().splitlines()
    return bool(lines) and lines[0].strip() == target


# --- the grid -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    name: str
    targets: tuple[str, ...]
    r: int
    lr: float
    warmup_steps: int

    def describe(self) -> str:
        targets = "all-linear" if self.targets == ("all-linear",) else ",".join(self.targets)
        return f"{targets} r={self.r} lr={self.lr:g} warm-up {self.warmup_steps}"


QV, ALL = ("q_proj", "v_proj"), ("all-linear",)
SETTINGS = {s.name: s for s in (
    Setting("old", QV, 8, 2e-4, 0),          # the trainer's defaults before this grid
    Setting("centre", ALL, 16, 1e-3, 10),
    Setting("qv", QV, 16, 1e-3, 10),
    Setting("r8", ALL, 8, 1e-3, 10),
    Setting("r32", ALL, 32, 1e-3, 10),
    Setting("lr2e-3", ALL, 16, 2e-3, 10),
    Setting("lr5e-4", ALL, 16, 5e-4, 10),
    Setting("nowarm", ALL, 16, 1e-3, 0),
)}


def run_one(task: str, setting: Setting, steps: int, work: Path, seed: int = 0) -> dict:
    """Train one setting on one task and score it; returns the result record."""
    from lorakit.generate import generate_batch
    from lorakit.hub import load_model_and_tokenizer
    from lorakit.peft_model import PeftModel
    from lorakit.prompts import encode_prompt
    from lorakit.train.loop import train
    from lorakit.train.tasks import write_jsonl

    train_rows, held_out = make_task(task, 1000, 48, seed)
    out = work / f"{task}-{setting.name}"
    data = write_jsonl(train_rows, out / "train.jsonl")
    start = time.perf_counter()
    summary = train(data=str(data), out=str(out), val_fraction=0.0, r=setting.r, lora_alpha=2 * setting.r,
                    target_modules=list(setting.targets), max_steps=steps, batch_size=8, lr=setting.lr,
                    warmup_steps=setting.warmup_steps, max_seq_len=128, seed=seed, quiet=True)
    train_s = time.perf_counter() - start
    base, tokenizer = load_model_and_tokenizer(None)
    model = PeftModel.from_pretrained(base, summary["adapter"])  # the saved adapter, as a user would load it
    prompts = [encode_prompt(example, tokenizer) for example in held_out]
    predictions = generate_batch(model, tokenizer, prompts, max_new_tokens=24, batch_size=48)
    hits = sum(exact(p, e["output"]) for p, e in zip(predictions, held_out))
    return {"task": task, "setting": setting.name, "describe": setting.describe(), "steps": steps,
            "exact": hits, "of": len(held_out), "train_seconds": round(train_s, 1),
            "final_loss": summary["train_loss"], "sample": predictions[:2]}


def read_results(path: Path) -> dict[tuple[str, str], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(row["task"], row["setting"]): row for row in rows}


def table(results: dict[tuple[str, str], dict], tasks: list[str]) -> str:
    lines = ["| setting | " + " | ".join(tasks) + " | worst | mean |", "|---|" + "---|" * (len(tasks) + 2)]
    for name, setting in SETTINGS.items():
        rows = [results.get((task, name)) for task in tasks]
        if not any(rows):
            continue
        cells = [f"{row['exact']}/{row['of']}" if row else "-" for row in rows]
        scores = [row["exact"] / row["of"] for row in rows if row]
        full = len(scores) == len(tasks)
        worst = f"{100 * min(scores):.0f}%" if full else "-"
        mean = f"{100 * sum(scores) / len(scores):.0f}%" if full else "-"
        lines.append(f"| {name}: {setting.describe()} | " + " | ".join(cells) + f" | {worst} | {mean} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--results", default="runs/defaults_grid/results.jsonl")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = read_results(results_path)
    tasks = args.tasks.split(",")
    for name in args.settings.split(","):
        for task in tasks:
            if (task, name) in results:
                continue
            row = run_one(task, SETTINGS[name], args.steps, results_path.parent)
            results[(task, name)] = row
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task:7s} {name:8s} {row['exact']}/{row['of']}  ({row['train_seconds']} s)  {row['sample']}",
                  flush=True)
    text = table(results, tasks)
    print(text)
    if args.write_docs:
        write_docs(text, args.steps)


def write_docs(text: str, steps: int) -> None:
    """Replace the grid's marked section of docs/defaults.md (the reasoning around it stays)."""
    from benchmarks.common import write_section

    start, end = "<!-- benchmarks.defaults_grid: start -->", "<!-- benchmarks.defaults_grid: end -->"
    body = (f"{start}\n"
            f"`python -m benchmarks.defaults_grid --write-docs` (see its docstring) trains the embedded\n"
            f"SmolLM2-135M-Instruct for {steps} steps (batch 8) per setting on three generated tasks and scores\n"
            f"48 held-out examples each by exact match (greedy):\n\n"
            f"- dates: format conversion, a date in one of nine written forms -> ISO 8601;\n"
            f"- intent: classification of a support message into one of six labels;\n"
            f"- past: a short rewrite of a sentence into the past tense.\n\n"
            f"lora_alpha is 2r in every setting; lora_dropout 0.05.\n\n{text}\n{end}")
    write_section(Path(__file__).resolve().parent.parent / "docs" / "defaults.md", start, end, body)


if __name__ == "__main__":
    main()
