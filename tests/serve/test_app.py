"""`lorakit serve` end to end: a real uvicorn server on a tiny model, driven by the official openai client.

Every greedy answer is compared with what the library itself produces for that adapter alone
(`PeftModel.from_pretrained(...).generate(do_sample=False)`).
"""

import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorakit import LoraConfig, PeftModel, cli, get_peft_model
from lorakit.serve.app import create_app, serve

from conftest import tiny_llama

WORDS = ("the a cat dog bird fish sat ran flew swam on in under over mat tree sky sea and then big small red blue "
         "green old young happy sad sun moon star user assistant system : . ,").split()
VOCAB = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
PROMPTS = ["the cat sat on the mat", "a big red sun", "the old dog ran and"]
LIMITS = dict(max_prompt_tokens=48, max_tokens_limit=24, max_request_bytes=4000)


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a few dozen words, with a chat template."""
    words = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def base_model(context: int = 64):
    # initializer_range 0.3: logits far apart, so argmax is not decided by float rounding
    return tiny_llama(0, vocab_size=len(VOCAB), initializer_range=0.3, max_position_embeddings=context)


def write_adapter(path, seed, targets, base=None):
    torch.manual_seed(seed)
    model = get_peft_model(base or base_model(), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                            target_modules=targets))
    model.save_pretrained(str(path))


def write_files(tmp_path_factory):
    """outside/a (given on the command line), outside/evil; adapters/{b,c,d} good, otherbase and broken bad."""
    root = tmp_path_factory.mktemp("serve")
    write_adapter(root / "outside" / "a", 1, ["q_proj", "v_proj"])
    write_adapter(root / "outside" / "evil", 2, ["q_proj"])
    write_adapter(root / "adapters" / "b", 3, "all-linear")
    write_adapter(root / "adapters" / "c", 4, ["o_proj", "down_proj"])
    write_adapter(root / "adapters" / "d", 5, ["k_proj", "up_proj"])
    write_adapter(root / "adapters" / "otherbase", 6, ["q_proj"],
                  base=tiny_llama(0, vocab_size=len(VOCAB), hidden_size=16, num_attention_heads=2, num_key_value_heads=1))
    (root / "adapters" / "broken").mkdir()
    (root / "adapters" / "broken" / "adapter_config.json").write_text('{"r": "not a number"')
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The adapter folders of `write_files`, once per module."""
    return write_files(tmp_path_factory)


@functools.cache
def library_answer(adapter_path: str | None, prompt_ids: tuple[int, ...], max_new_tokens: int,
                   eos: bool = True) -> list[int]:
    """Token ids the library generates greedily for one prompt with one adapter alone (None: the base)."""
    model = base_model(context=512)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    if not eos:
        model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port, in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def make_app(files, context=64, **overrides):
    options = dict(model_name="tiny", adapters={"a": str(files / "outside" / "a")},
                   adapter_dir=str(files / "adapters"), max_loaded=3, max_batch_size=8, **LIMITS)
    options.update(overrides)
    return create_app(base_model(context), tokenizer(), **options)


@pytest.fixture(scope="module")
def server(files):
    app = make_app(files)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def path_of(files, model):
    return {"tiny": None, "a": files / "outside" / "a"}.get(model, files / "adapters" / model)


def expected(files, model, prompt_ids, max_tokens, eos=True):
    """(text, token count, finish_reason) the library gives for this model alone."""
    path = path_of(files, model)
    ids = library_answer(None if path is None else str(path), tuple(prompt_ids), max_tokens, eos)
    finish = "stop" if eos and ids[-1] == tokenizer().eos_token_id else "length"
    return tokenizer().decode(ids, skip_special_tokens=True), len(ids), finish


def ids_of(prompt):
    return tokenizer()(prompt)["input_ids"]


# --- answers ---------------------------------------------------------------------------------------------

def test_models_lists_the_base_and_loaded_adapters(server, client):
    ids = [card.id for card in client.models.list().data]
    assert ids[0] == "tiny" and "a" in ids  # "a" was given on the command line: attached at startup
    assert ids[1:] == server[1].state.registry.loaded()


@pytest.mark.parametrize("model", ["tiny", "a", "b"])
def test_completion_equals_the_library_answer(files, client, model):
    response = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    text, n_tokens, finish = expected(files, model, ids_of(PROMPTS[1]), 12)
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason) == (text, finish)
    assert response.model == model and response.object == "text_completion"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids_of(PROMPTS[1])), n_tokens)
    assert response.usage.total_tokens == response.usage.prompt_tokens + n_tokens


def test_chat_renders_the_chat_template(files, client):
    messages = [{"role": "system", "content": "the sun"}, {"role": "user", "content": "a happy dog and a sad cat"}]
    response = client.chat.completions.create(model="c", messages=messages, max_tokens=10, temperature=0)
    prompt_ids = tokenizer()(tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]
    text, n_tokens, finish = expected(files, "c", prompt_ids, 10)
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), n_tokens)


def test_streaming_sends_openai_chunks_then_done(files, server, client):
    text, n_tokens, finish = expected(files, "b", ids_of(PROMPTS[0]), 12)
    chunks = list(client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens

    chat = list(client.chat.completions.create(model="b", messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" and c.id == chat[0].id for c in chat)

    with httpx.stream("POST", server[0] + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_concurrent_requests_for_different_adapters_share_forwards(files, server, client):
    engine = server[1].state.engine
    shared_before = sum(n for size, n in engine.stats.decode_batch_sizes.items() if size > 1)
    jobs = [(model, prompt) for model in ["tiny", "a", "b"] for prompt in PROMPTS]
    barrier = threading.Barrier(len(jobs))
    answers = {}

    def ask(model, prompt):
        barrier.wait()
        answers[model, prompt] = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for model, prompt in jobs:
        text, n_tokens, finish = expected(files, model, ids_of(prompt), 20)
        response = answers[model, prompt]
        assert (response.choices[0].text, response.usage.completion_tokens, response.choices[0].finish_reason) == \
            (text, n_tokens, finish), (model, prompt)
    assert len({answers[m, PROMPTS[1]].choices[0].text for m in ["tiny", "a", "b"]}) == 3  # adapters matter
    assert sum(n for size, n in engine.stats.decode_batch_sizes.items() if size > 1) > shared_before


def test_stop_strings_end_the_text(files, client):
    text, _, _ = expected(files, "b", ids_of(PROMPTS[2]), 12)
    stop = text.split()[2]
    response = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (text[:text.index(stop)], "stop")
    streamed = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="a", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, top_p=0.9)
    first = [client.completions.create(seed=seed, **kwargs).choices[0].text for seed in range(4)]
    again = [client.completions.create(seed=seed, **kwargs).choices[0].text for seed in range(4)]
    assert first == again
    assert len(set(first)) > 1  # different seeds, different samples


# --- refusals --------------------------------------------------------------------------------------------

def long_prompt(n_words):
    return " ".join(["cat"] * n_words)


REFUSALS = [
    ("/v1/completions", {"model": "../a", "prompt": "cat"}, 400, "invalid_adapter_name"),
    ("/v1/completions", {"model": "a/b", "prompt": "cat"}, 400, "invalid_adapter_name"),
    ("/v1/completions", {"model": "nope", "prompt": "cat"}, 404, "model_not_found"),
    ("/v1/completions", {"model": "tiny", "prompt": "cat", "n": 2}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "cat", "logprobs": 2}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "cat", "temperature": 3}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": long_prompt(49)}, 400, "prompt_too_long"),
    ("/v1/completions", {"model": "tiny", "prompt": "cat", "max_tokens": 25}, 400, "max_tokens_too_large"),
    ("/v1/completions", {"model": "tiny", "prompt": long_prompt(45), "max_tokens": 20}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 999]}, 400, None),
    ("/v1/completions", {"model": "otherbase", "prompt": "cat"}, 400, "invalid_adapter"),
    ("/v1/completions", {"model": "broken", "prompt": "cat"}, 400, "invalid_adapter"),
    ("/v1/completions", {"model": "tiny", "prompt": long_prompt(1000)}, 413, "request_too_large"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, None),
    ("/v1/load_lora_adapter", {"lora_name": "x/y", "lora_path": "b"}, 400, "invalid_adapter_name"),
    ("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "../outside/evil"}, 400, "adapter_path_not_allowed"),
    ("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "/etc"}, 400, "adapter_path_not_allowed"),
    ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "b"}, 400, "invalid_adapter_name"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("route, body, status, code", REFUSALS)
def test_refusals_answer_openai_errors(server, route, body, status, code):
    response = httpx.post(server[0] + route, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == code


def test_refusals_keep_the_server_serving(files, server, client):
    assert httpx.post(server[0] + "/v1/completions", content=b"{not json", timeout=30).status_code == 400
    chunked = httpx.post(server[0] + "/v1/completions", content=iter([b"x" * 3000, b"x" * 3000]), timeout=30)
    assert (chunked.status_code, chunked.json()["error"]["code"]) == (413, "request_too_large")  # no Content-Length
    with pytest.raises(openai.BadRequestError, match="shape mismatches") as refused:
        client.completions.create(model="otherbase", prompt="cat", max_tokens=2)
    assert refused.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "cat"}])
    text, _, _ = expected(files, "tiny", ids_of(PROMPTS[0]), 5)
    assert client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0).choices[0].text == text
    assert httpx.get(server[0] + "/health", timeout=30).json()["status"] == "ok"
    assert "otherbase" not in [m.id for m in client.models.list().data]


# --- adapters at run time --------------------------------------------------------------------------------

def test_load_use_unload_and_reload(files):
    with running(make_app(files)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        text, _, _ = expected(files, "d", ids_of(PROMPTS[1]), 8)

        def ask():
            return client.completions.create(model="fresh", prompt=PROMPTS[1], max_tokens=8, temperature=0)

        def models():
            return [m.id for m in client.models.list().data]

        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "d"}).status_code == 200
        assert "fresh" in models() and ask().choices[0].text == text
        again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "d"})
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]

        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert "fresh" not in models()
        with pytest.raises(openai.NotFoundError):
            ask()
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "d"}).status_code == 200
        assert ask().choices[0].text == text

        outside = str(files / "outside" / "a")  # outside --adapter-dir, but given on the command line
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": outside}).status_code == 200
        a_text, _, _ = expected(files, "a", ids_of(PROMPTS[1]), 8)
        assert client.completions.create(model="a2", prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text == a_text


def test_least_recently_used_adapter_is_evicted(files):
    with running(make_app(files, max_loaded=2)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def use(model):
            return client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0).choices[0].text

        def loaded():
            return [m.id for m in client.models.list().data][1:]

        use("b")
        assert loaded() == ["a", "b"]
        use("a")
        use("c")  # evicts b: a was used after it
        assert loaded() == ["a", "c"]
        assert use("b") == expected(files, "b", ids_of(PROMPTS[0]), 4)[0]  # comes back from --adapter-dir
        assert loaded() == ["c", "b"]


def test_adapter_in_use_is_neither_evicted_nor_unloaded(files):
    app = make_app(files, max_loaded=1)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        gate = threading.Event()
        app.state.engine.run_between_steps(gate.wait)  # hold the engine between two steps
        answer = {}
        thread = threading.Thread(target=lambda: answer.setdefault("a", client.completions.create(
            model="a", prompt=PROMPTS[2], max_tokens=6, temperature=0)))
        thread.start()
        deadline = time.monotonic() + 30
        while app.state.registry.pins("a") == 0:  # the request holds "a" while it waits for the engine
            assert time.monotonic() < deadline
            time.sleep(0.01)

        # "b" needs the only slot, which "a" holds: it waits for it instead of failing
        busy = threading.Thread(target=lambda: answer.setdefault("b", client.completions.create(
            model="b", prompt=PROMPTS[1], max_tokens=4, temperature=0)))
        busy.start()
        wait_until(lambda: app.state.registry.waiting() == 1)
        in_use = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30)
        assert (in_use.status_code, in_use.json()["error"]["code"]) == (409, "adapter_in_use")
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # HTTP stays responsive
        assert app.state.registry.loaded() == ["a"] and "b" not in answer

        gate.set()
        thread.join(30)
        busy.join(30)
        assert answer["a"].choices[0].text == expected(files, "a", ids_of(PROMPTS[2]), 6)[0]
        assert answer["b"].choices[0].text == expected(files, "b", ids_of(PROMPTS[1]), 4)[0]
        assert [m.id for m in client.models.list().data] == ["tiny", "b"]


# --- slow and vanishing clients --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_server(files):
    """Generations always run to max_tokens (no end-of-sequence token): long enough to interrupt."""
    app = make_app(files, context=512, max_tokens_limit=300, max_request_bytes=4000)
    app.state.engine.eos_token_ids = set()
    with running(app) as url:
        yield url, app


def test_a_paused_stream_does_not_stall_other_requests(files, long_server):
    url, app = long_server
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: ")
        # This client now stops reading; another one is answered meanwhile.
        started = time.monotonic()
        other = httpx.post(url + "/v1/completions", json={"model": "b", "prompt": PROMPTS[1], "max_tokens": 5,
                                                          "temperature": 0}, timeout=30).json()
        assert time.monotonic() - started < 20
        assert other["choices"][0]["text"] == expected(files, "b", ids_of(PROMPTS[1]), 5, eos=False)[0]
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"completion_tokens":300' in rest[-2]  # nothing lost while paused


def test_a_client_that_leaves_frees_its_row(long_server):
    url, app = long_server
    engine, registry = app.state.engine, app.state.registry
    cancelled, prefills = engine.stats.cancelled, engine.stats.prefills

    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 300, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
        next(line for line in stream.iter_lines() if line)
    wait_until(lambda: engine.stats.cancelled == cancelled + 1 and engine.num_running == 0 and registry.pins("a") == 0)

    gate = threading.Event()
    engine.run_between_steps(gate.wait)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up before the first step
        httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "cat", "max_tokens": 300}, timeout=0.5)
    wait_until(lambda: any(seq.cancelled for seq in engine._waiting))  # the server saw the disconnect
    gate.set()
    wait_until(lambda: engine.stats.cancelled == cancelled + 2 and registry.pins("a") == 0)
    assert engine.stats.prefills == prefills + 1  # the second one never ran


def wait_until(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- the command -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    pytest.importorskip("lorakit.hub")
    folder = tmp_path_factory.mktemp("tiny-model")
    base_model().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(files, model_folder, monkeypatch):
    """`lorakit serve ...` through the CLI parser, in this process (the uvicorn.Server is recorded to stop it)."""
    servers = []

    class RecordedServer(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", RecordedServer)
    monkeypatch.setenv("LORAKIT_API_KEY", "env-key")
    port = free_port()
    argv = ["serve", "--model", str(model_folder), "--port", str(port), "--served-model-name", "tiny",
            "--adapter", f"a={files / 'outside' / 'a'},b={files / 'adapters' / 'b'}", "--adapter-dir",
            str(files / "adapters"), "--max-loaded", "3", "--max-tokens-limit", "8", "--no-adapter-loading",
            "--max-queue", "4", "--request-timeout", "120", "--body-timeout", "20"]
    exit_code = []
    thread = threading.Thread(target=lambda: exit_code.append(cli.main(argv)))
    thread.start()
    try:
        wait_until(lambda: servers and servers[0].started, timeout=60)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401  # LORAKIT_API_KEY is the key
        headers = {"Authorization": "Bearer env-key"}
        load = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "d"}, headers=headers)
        assert load.status_code == 403  # --no-adapter-loading
        assert servers[0].config.app.state.admission.capacity == 16 + 4  # --max-batch-size + --max-queue
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "a", "b"]
        for model in ["a", "c"]:
            response = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
            assert response.choices[0].text == expected(files, model, ids_of(PROMPTS[0]), 6)[0]
        with pytest.raises(openai.BadRequestError, match="max-tokens-limit"):
            client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=9)
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    assert exit_code == [0]


@pytest.mark.slow
def test_serve_command_in_a_subprocess(files, model_folder):
    port = free_port()
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--model", str(model_folder), "--port", str(port),
               "--adapter", f"a={files / 'outside' / 'a'},b={files / 'adapters' / 'b'}",
               "--adapter-dir", str(files / "adapters"), "--served-model-name", "tiny"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            assert process.poll() is None, process.stderr.read().decode()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=60)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "a", "b"]
        for model in ["a", "c"]:
            response = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
            assert response.choices[0].text == expected(files, model, ids_of(PROMPTS[0]), 6)[0]
    finally:
        process.terminate()
        process.wait(30)


def test_serve_refuses_a_bad_command_line_adapter(files, model_folder):
    with pytest.raises(ValueError, match="shape mismatches"):
        serve(model=str(model_folder), adapter=[f"bad={files / 'adapters' / 'otherbase'}"], port=free_port())
    with pytest.raises(ValueError, match="NAME=PATH"):
        serve(model=str(model_folder), adapter=["no-equals-sign"], port=free_port())


def test_serve_device_flag_and_max_batch(capsys):
    from lorakit.devices import available

    missing = next(kind for kind in ("cuda", "mps") if kind not in available())
    for device, message in [(missing, f"this machine has no {missing.upper()} device"), ("tpu", "unknown device 'tpu'")]:
        assert cli.main(["serve", "--device", device, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert cli.parse("serve", ["--max-batch", "4"])["max_batch_size"] == 4  # --max-batch is --max-batch-size
    assert cli.main(["serve", "--batch-wait-ms", "-1", "--port", str(free_port())]) == 2
    assert "--batch-wait-ms must be in [0, 1000], got -1" in capsys.readouterr().err
