"""A real server on loopback under load/unload churn: many concurrent greedy completions over
more adapters than `max_loaded` holds, while another client loads and unloads an adapter over and
over. Every answer is the library's own for that adapter alone, or (for the adapter being churned,
when it is unloaded at that moment) a 404; never a 500 or 503, never a wrong answer. At the end the
registry, the model's adapters and /v1/models agree, and nothing is pinned, waiting or admitted.

    pytest tests/reliability/test_serve_churn.py -m "slow or not slow" -s     # prints the figures
"""

from __future__ import annotations

import collections
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lorakit.layers import LoraLayer
from lorakit.serve.app import create_app

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))  # the server tests' fixtures, as test_production uses them
from test_app import LIMITS, PROMPTS, base_model, ids_of, library_answer, running, tokenizer, write_adapter  # noqa: E402

TARGETS = {"b": "all-linear", "c": ["o_proj", "down_proj"], "d": ["k_proj", "up_proj"], "e": ["q_proj", "v_proj"]}
CHURNED = "churn"  # loaded from adapters/e and unloaded, over and over
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("churn")
    for seed, (name, targets) in enumerate(TARGETS.items(), start=11):
        write_adapter(root / name, seed, targets)
    return root


def reference(adapters: Path, model: str, prompt: str) -> str:
    """The library's greedy answer for `model` alone."""
    path = adapters / ("e" if model == CHURNED else model)
    ids = library_answer(str(path), tuple(ids_of(prompt)), MAX_TOKENS)
    return tokenizer().decode(ids, skip_special_tokens=True)


def churn(adapters: Path, clients: int, requests_each: int, cycles: int, seed: int) -> dict:
    base = base_model()
    app = create_app(base, tokenizer(), model_name="tiny", adapter_dir=str(adapters), max_loaded=2,
                     max_batch_size=4, request_timeout=60, **LIMITS)  # a stuck request is a 504, not a hang
    models = [*TARGETS, CHURNED]
    expected = {(m, p): reference(adapters, m, p) for m in models for p in PROMPTS}
    figures, lock = collections.Counter(), threading.Lock()
    wrong: list[str] = []

    def count(key: str) -> None:
        with lock:
            figures[key] += 1

    done = threading.Event()
    with running(app) as url:
        def ask(worker: int) -> None:
            rng = random.Random(seed * 1000 + worker)
            with httpx.Client(base_url=url, timeout=120) as client:
                for _ in range(requests_each):
                    model, prompt = rng.choice(models), rng.choice(PROMPTS)
                    response = client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                                     "max_tokens": MAX_TOKENS, "temperature": 0})
                    count("requests")
                    if response.status_code == 200 and response.json()["choices"][0]["text"] == expected[model, prompt]:
                        count("correct")
                    elif response.status_code == 404 and model == CHURNED \
                            and response.json()["error"]["code"] == "model_not_found":
                        count("not_found_while_unloaded")
                    else:
                        wrong.append(f"{model} {prompt!r}: {response.status_code} {response.text[:300]}")

        def load_and_unload() -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=120) as client:
                for _ in range(cycles):
                    if done.is_set():
                        break
                    response = client.post("/v1/load_lora_adapter", json={"lora_name": CHURNED, "lora_path": "e"})
                    count(f"load {response.status_code}")
                    if response.status_code != 200:
                        wrong.append(f"load: {response.status_code} {response.text[:300]}")
                    threading.Event().wait(rng.uniform(0, 0.05))
                    give_up = time.monotonic() + 60
                    while time.monotonic() < give_up:  # 409 while a running request holds it: documented, try again
                        response = client.post("/v1/unload_lora_adapter", json={"lora_name": CHURNED})
                        count(f"unload {response.status_code}")
                        if response.status_code != 409:
                            break
                        threading.Event().wait(0.01)
                    if response.status_code != 200:
                        wrong.append(f"unload: {response.status_code} {response.text[:300]}")
                    threading.Event().wait(rng.uniform(0, 0.05))

        with ThreadPoolExecutor(clients + 1) as pool:
            churner = pool.submit(load_and_unload)
            workers = [pool.submit(ask, i) for i in range(clients)]
            try:
                for future in workers:
                    future.result()  # a worker's error is raised here, after the churner has stopped
            finally:
                done.set()
            churner.result()
        registry = app.state.registry
        loaded = registry.loaded()
        in_model = app.state.engine.run_between_steps(
            lambda: sorted({n for m in base.modules() if isinstance(m, LoraLayer) for n in m.adapters})).result(30)
        listed = [card["id"] for card in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        assert sorted(loaded) == in_model and listed == ["tiny", *loaded], (loaded, in_model, listed)
        assert len(loaded) <= 2 and CHURNED not in loaded
        assert registry.waiting() == 0 and all(registry.pins(name) == 0 for name in models)
        assert app.state.admission.admitted == 0
    assert not wrong, "\n".join(wrong[:20])
    assert figures["correct"] + figures["not_found_while_unloaded"] == figures["requests"] == clients * requests_each
    return dict(figures)


@pytest.mark.slow
def test_800_requests_over_five_adapters_and_two_slots_while_one_is_loaded_and_unloaded(adapters):
    figures = churn(adapters, clients=8, requests_each=100, cycles=10_000, seed=0)
    print(f"\nserve churn: {json.dumps(figures)}")


def test_a_short_churn(adapters):
    figures = churn(adapters, clients=4, requests_each=10, cycles=10_000, seed=1)
    assert figures["requests"] == 40 and figures["load 200"] >= 1
