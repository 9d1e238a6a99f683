"""Every corrupted variant of a saved adapter (tests/reliability/corrupt.py, > 100 of them), loaded
by the library and by the server's load route.

The library: `PeftModel.from_pretrained` onto a fresh base and `load_adapter` onto a model that
already holds another (trained) adapter. Each variant is refused with an error class lorakit
defines, naming the problem, and the model is bit-identical to before (structure, weights,
adapters, trainable flags, outputs); or, for the few valid variants, it loads.

The server: `POST /v1/load_lora_adapter` answers 4xx in OpenAI's error shape (200 for a valid
variant), never 500, and the next completion is still the library's own answer.

    pytest tests/reliability/test_corrupted_adapters.py -m "slow or not slow" -s   # prints tried / handled / failed
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import httpx
import pytest

from lorakit import LoraConfig, PeftModel, get_peft_model

from conftest import perturb_trainables, tiny_llama
from corrupt import restore_permissions, write_variants

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))  # the server tests' fixtures, as test_production uses them
from test_app import PROMPTS, ids_of, library_answer, make_app, running, tokenizer, write_adapter  # noqa: E402
from test_peft_model import assert_same, snapshot  # noqa: E402

import torch  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    found = write_variants(root)
    yield found
    restore_permissions(root)


def lorakit_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "lorakit"


def outcome(call, model, variant, keeps_outputs: bool) -> str:
    """Run one load; returns "" when it behaved as the variant says it must, else what went wrong.
    With `keeps_outputs`, a load that succeeds must not change the model's outputs either (the
    active adapter stays the one it was)."""
    before = snapshot(model, IDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Exception as err:  # noqa: BLE001 - which class it is, is what is tested
        if variant.loads:
            return f"refused a valid adapter: {type(err).__name__}: {err}"
        if not lorakit_error(err):
            return f"raw {type(err).__module__}.{type(err).__name__}: {err}"
        if variant.match and not re.search(variant.match, str(err), re.IGNORECASE):
            return f"{type(err).__name__} does not name {variant.match!r}: {err}"
        try:
            assert_same(before, snapshot(model, IDS))
        except AssertionError as changed:
            return f"the model changed ({changed}) after {type(err).__name__}: {err}"
        return ""
    if not variant.loads:
        return "loaded"
    if keeps_outputs and not torch.equal(snapshot(model, IDS)["logits"], before["logits"]):
        return "loading it changed the outputs of the adapter already active"
    return ""


def report(title: str, results: dict[str, str]) -> str:
    failed = {name: why for name, why in results.items() if why}
    lines = [f"{title}: tried {len(results)}, handled {len(results) - len(failed)}, failed {len(failed)}"]
    lines += [f"  {name}: {why[:300]}" for name, why in failed.items()]
    return "\n".join(lines)


def test_the_generator_covers_every_group(written):
    groups = {}
    for variant, _ in written:
        groups[variant.group] = groups.get(variant.group, 0) + 1
    assert len(written) >= 100 and set(groups) == {"file", "header", "tensors", "config"}
    assert all(n >= 10 for n in groups.values()), groups
    assert 0 < sum(v.loads for v, _ in written) < 20


def test_the_library_refuses_every_corrupted_adapter_by_name_and_changes_nothing(written):
    results = {}
    for variant, folder in written:
        base = tiny_llama()
        results[f"from_pretrained {variant.name}"] = outcome(
            lambda: PeftModel.from_pretrained(base, str(folder)), base, variant, keeps_outputs=False)
        holder = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj", "o_proj"]), adapter_name="other")
        perturb_trainables(holder)
        results[f"load_adapter {variant.name}"] = outcome(
            lambda: holder.load_adapter(str(folder), "incoming"), holder, variant, keeps_outputs=True)
    text = report("corrupted adapters, library", results)
    print("\n" + text)
    assert not any(results.values()), text


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow), 5], ids=["every", "every-5th"])
def test_the_server_answers_corrupted_adapters_with_a_4xx_and_keeps_answering(written, tmp_path, stride):
    """Every variant (slow: ~20 s, a completion after each) or every fifth (the default suite)."""
    root = written[0][1].parent
    write_adapter(tmp_path / "a", 1, ["q_proj", "v_proj"])
    app = make_app(tmp_path, adapters={"a": str(tmp_path / "a")}, adapter_dir=str(root))
    prompt = ids_of(PROMPTS[0])
    ids = library_answer(str(tmp_path / "a"), tuple(prompt), 6)
    reference = tokenizer().decode(ids, skip_special_tokens=True)  # the library's greedy answer
    results = {}
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def answer() -> str:
            response = client.post("/v1/completions", json={"model": "a", "prompt": prompt, "max_tokens": 6,
                                                             "temperature": 0})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        assert answer() == reference
        for i, (variant, folder) in enumerate(written[::stride]):
            name = f"v{i}"
            response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": folder.name})
            why = ""
            if variant.loads:
                if response.status_code != 200:
                    why = f"refused a valid adapter: {response.status_code} {response.text}"
                else:
                    client.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
            elif not 400 <= response.status_code < 500:
                why = f"{response.status_code}: {response.text}"
            else:
                error = response.json().get("error", {})
                if set(error) != {"message", "type", "param", "code"} or not error["message"]:
                    why = f"not OpenAI's error shape: {response.text}"
            if not why and answer() != reference:
                why = "the server's answer for adapter 'a' changed"
            results[variant.name] = why
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    text = report("corrupted adapters, server load route", results)
    print("\n" + text)
    assert not any(results.values()), text
