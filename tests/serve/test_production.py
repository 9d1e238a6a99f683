"""`lorakit serve` in production: API keys, capacity and deadlines, metrics and logs, client mistakes.

A real uvicorn server on loopback (test_app's fixtures), driven by the openai client, httpx and
http.client (which shows whether a connection is kept alive).
"""

import http.client
import json
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_app import PROMPTS, expected, ids_of, make_app, running, wait_until, write_files

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """test_app's adapter folders, written for this module."""
    return write_files(tmp_path_factory)


def error_of(response):
    """The OpenAI error body of a response (asserting its shape)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    return error


def long_app(files, **overrides):
    """Generations always run to max_tokens (no end-of-sequence token)."""
    app = make_app(files, context=512, max_tokens_limit=300, **overrides)
    app.state.engine.eos_token_ids = set()
    return app


def hold_engine(app):
    """Stop the engine between two steps until the returned event is set."""
    gate = threading.Event()
    app.state.engine.run_between_steps(gate.wait)
    return gate


def in_thread(fn):
    """Run fn() in a thread; returns (thread, results list)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(fn()))
    thread.start()
    return thread, results


def ask_together(client, jobs, max_tokens, timeout=60):
    """Greedy completions for [(model, prompt)], sent at once from one thread each; their answers in order."""
    barrier = threading.Barrier(len(jobs))

    def ask(model, prompt):
        barrier.wait()
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)

    threads = [in_thread(lambda job=job: ask(*job)) for job in jobs]
    for thread, _ in threads:
        thread.join(timeout)
    assert all(results for _, results in threads), "a request did not answer"
    return [results[0] for _, results in threads]


def metric_samples(url, headers=None):
    """{(name, sorted labels): value} from GET /metrics."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def connection(url):
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def post_raw(conn, path, body: bytes, headers=None):
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response, response.read()


# --- API keys ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(files):
    app = make_app(files, api_key=KEY)
    with running(app) as url:
        yield url, app


def test_every_route_but_health_needs_the_key(files, keyed_server):
    url, _ = keyed_server
    for key in ("wrong", KEY + "x", KEY[:-1]):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()

    requests = [("POST", "/v1/completions", {"model": "tiny", "prompt": "cat"}),
                ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "cat"}]}),
                ("GET", "/v1/models", None), ("GET", "/metrics", None),
                ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "d"}),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})]
    for method, path, body in requests:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
            response = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (path, headers)
            assert error_of(response)["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    assert "a" in [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).models.list().data]

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    answer = client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert answer.choices[0].text == expected(files, "b", ids_of(PROMPTS[0]), 6)[0]
    assert httpx.get(url + "/metrics", headers={"Authorization": f"bearer {KEY}"}, timeout=30).status_code == 200


def test_a_refused_key_keeps_the_connection(keyed_server):
    url, _ = keyed_server
    conn = connection(url)
    body = json.dumps({"model": "tiny", "prompt": "cat", "max_tokens": 2}).encode()
    response, _ = post_raw(conn, "/v1/completions", body, {"Authorization": "Bearer wrong"})
    assert response.status == 401 and not response.will_close
    sock = conn.sock
    response, _ = post_raw(conn, "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert response.status == 200 and conn.sock is sock  # the same connection answered


def test_no_adapter_loading_turns_the_admin_routes_off(files):
    app = make_app(files, adapter_loading=False)
    with running(app) as url:
        for path, body in [("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "d"}),
                           ("/v1/unload_lora_adapter", {"lora_name": "a"}),
                           ("/v1/load_lora_adapter", {"not": "even valid"})]:
            response = httpx.post(url + path, json=body, timeout=30)
            assert response.status_code == 403
            error = error_of(response)
            assert error["code"] == "adapter_loading_disabled" and "--no-adapter-loading" in error["message"]
        assert "a" in app.state.registry.loaded()  # the unload did nothing
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        answer = client.completions.create(model="d", prompt=PROMPTS[1], max_tokens=5, temperature=0)
        assert answer.choices[0].text == expected(files, "d", ids_of(PROMPTS[1]), 5)[0]  # --adapter-dir still loads


# --- capacity and deadlines ------------------------------------------------------------------------------

def test_requests_beyond_capacity_get_429_with_retry_after(files):
    app = make_app(files, max_batch_size=1, max_queue=1)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        gate = hold_engine(app)
        waiting = [in_thread(lambda p=p: client.completions.create(model="a", prompt=p, max_tokens=5, temperature=0))
                   for p in PROMPTS[:2]]
        wait_until(lambda: app.state.admission.admitted == 2)
        samples = metric_samples(url)
        assert samples[("lorakit_queue_depth", ())] == 2 and samples[("lorakit_running_requests", ())] == 0

        full = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "cat"}, timeout=30)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert error_of(full)["code"] == "too_many_requests"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat"}])

        gate.set()
        for (thread, results), prompt in zip(waiting, PROMPTS):
            thread.join(60)
            assert results[0].choices[0].text == expected(files, "a", ids_of(prompt), 5)[0]
        assert app.state.admission.admitted == 0  # released before the answers were sent
        assert client.completions.create(model="tiny", prompt="cat", max_tokens=2).choices[0].finish_reason


@pytest.fixture(scope="module")
def deadline_server(files):
    app = long_app(files, request_timeout=3.0)
    with running(app) as url:
        yield url, app


def test_a_request_past_its_deadline_is_cancelled_with_504(deadline_server):
    url, app = deadline_server
    engine, cancelled, prefills = app.state.engine, app.state.engine.stats.cancelled, app.state.engine.stats.prefills
    gate = hold_engine(app)
    try:
        late = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "cat", "max_tokens": 300}, timeout=60)
        assert late.status_code == 504
        error = error_of(late)
        assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
    finally:
        gate.set()
    wait_until(lambda: engine.stats.cancelled == cancelled + 1 and app.state.admission.admitted == 0
               and app.state.registry.pins("a") == 0)
    assert engine.stats.prefills == prefills  # it never ran


def test_a_stream_past_its_deadline_ends_with_an_error_event(deadline_server):
    url, app = deadline_server
    engine, cancelled = app.state.engine, app.state.engine.stats.cancelled
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        gate = hold_engine(app)  # no more tokens: the deadline passes mid-stream
        try:
            rest = [line for line in lines if line]
        finally:
            gate.set()
    last = json.loads(rest[-1].removeprefix("data: "))
    assert last["error"]["code"] == "request_timeout" and "data: [DONE]" not in rest
    wait_until(lambda: engine.stats.cancelled == cancelled + 1 and engine.num_running == 0
               and app.state.admission.admitted == 0 and app.state.registry.pins("a") == 0)


def test_a_client_leaving_mid_stream_frees_its_slot(files):
    app = long_app(files)
    with running(app) as url:
        engine = app.state.engine
        body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 300, "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", url + "/v1/completions", json=body) as stream:
                next(line for line in stream.iter_lines() if line)
                assert app.state.admission.admitted == 1
        wait_until(lambda: engine.stats.cancelled == 1 and engine.num_running == 0
                   and app.state.admission.admitted == 0 and app.state.registry.pins("a") == 0)
        assert engine.stats.decode_batch_sizes.total() < 299  # it stopped long before max_tokens


def test_a_body_shorter_than_its_length_times_out_with_408(files):
    app = make_app(files, body_timeout=0.5)
    with running(app) as url:
        conn = connection(url)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b'{"model": "tiny"')  # 16 of the 100 bytes, then nothing
        response = conn.getresponse()
        assert response.status == 408 and response.will_close  # Connection: close
        error = json.loads(response.read())["error"]
        assert error["code"] == "request_body_timeout" and "--body-timeout" in error["message"]
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"


# --- client mistakes: a 4xx naming the problem, and the connection kept ----------------------------------

MISTAKES = [
    ({"model": "tiny", "prompt": "cat", "seed": 2**64}, 400, "seed", None),
    ({"model": "tiny", "prompt": "cat", "seed": -(2**63) - 1}, 400, "seed", None),
    ({"model": "tiny", "prompt": "cat", "stream": "yes"}, 400, "stream", None),
    ({"model": "tiny", "prompt": "cat", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options", None),
    ({"model": "tiny", "prompt": "cat", "max_tokens": "5"}, 400, "max_tokens", None),
    ({"model": "tiny", "prompt": "cat", "temperature": 1e40}, 400, "temperature", None),
    ({"model": "tiny", "prompt": "cat", "max_tokens": 25}, 400, "max_tokens", "max_tokens_too_large"),
    ({"model": "tiny", "prompt": " ".join(["cat"] * 49)}, 400, None, "prompt_too_long"),
    ({"model": "nope", "prompt": "cat"}, 404, None, "model_not_found"),
    ({"model": "tiny", "prompt": "cat", "n": 2}, 400, "n", None),
]
RAW_MISTAKES = [  # bodies json.dumps cannot write
    (b'{"model": "tiny", "prompt": "ca\\ud800t"}', 400, "prompt", "lone surrogate"),
    (b'{"model": "tiny", "prompt": ["\\udfff"]}', 400, "prompt", "lone surrogate"),
    (b'{"model": "tiny", "prompt": "cat", "stop": ["\\ud83d"]}', 400, "stop", "lone surrogate"),
    (b"[" * 1900 + b"]" * 1900, 400, None, None),  # nested too deeply to parse (under the 4000-byte limit)
    (b'{"model": "tiny", "prompt": "cat"', 400, None, "not valid JSON"),
]


@pytest.mark.parametrize("body, status, param, code", MISTAKES)
def test_mistakes_get_a_4xx_naming_the_field_and_keep_the_connection(server_url, body, status, param, code):
    check_mistake(server_url, "/v1/completions", json.dumps(body).encode(), status, param, code)


@pytest.mark.parametrize("body, status, param, words", RAW_MISTAKES)
def test_raw_mistakes_get_a_4xx_and_keep_the_connection(server_url, body, status, param, words):
    error = check_mistake(server_url, "/v1/completions", body, status, param, None)
    assert error is None or words is None or words in error["message"]


def test_chat_mistakes(server_url):
    content = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00 cat"}]}'
    error = check_mistake(server_url, "/v1/chat/completions", content, 400, "messages", None)
    assert "lone surrogate" in error["message"]
    check_mistake(server_url, "/v1/chat/completions",
                  json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "cat"}],
                              "stream": "yes"}).encode(), 400, "stream", None)


def test_unknown_paths_and_methods_answer_in_openai_shape(server_url):
    missing = httpx.get(server_url + "/v1/nothing", timeout=30)
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"
    wrong = httpx.get(server_url + "/v1/completions", timeout=30)
    assert wrong.status_code == 405 and error_of(wrong)


def check_mistake(url, path, body, status, param, code):
    """POST `body` on a kept-alive connection: the answer's status, param and code, then a good
    request answered on the same connection. Returns the error (None for a 2xx)."""
    conn = connection(url)
    response, content = post_raw(conn, path, body)
    assert response.status == status, content
    assert not response.will_close
    error = None
    if status >= 400:
        error = json.loads(content)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param and (code is None or error["code"] == code), error
    sock = conn.sock
    good, answer = post_raw(conn, "/v1/completions", b'{"model": "tiny", "prompt": "cat", "max_tokens": 2}')
    assert good.status == 200 and json.loads(answer)["usage"]["completion_tokens"] >= 1
    assert conn.sock is sock  # the same connection
    return error


@pytest.fixture(scope="module")
def server_url(files):
    with running(make_app(files)) as url:
        yield url


def test_tiny_temperatures_decode_greedily_and_big_seeds_work(files, server_url):
    client = openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    greedy = expected(files, "b", ids_of(PROMPTS[1]), 8)[0]
    for temperature in (1e-40, 1e-30, 5e-324):
        answer = client.completions.create(model="b", prompt=PROMPTS[1], max_tokens=8, temperature=temperature)
        assert answer.choices[0].text == greedy, temperature
    for seed in (2**64 - 1, -(2**63)):
        kwargs = dict(model="b", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=seed)
        assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_malformed_adapter_configs_are_refused_by_name(files, tmp_path):
    adapters = tmp_path / "adapters"
    for name, config in [("regex", None), ("deep", "[" * 100_000 + "]" * 100_000)]:
        (adapters / name).mkdir(parents=True)
        source = json.loads((files / "adapters" / "b" / "adapter_config.json").read_text())
        source["target_modules"] = "(unclosed"
        (adapters / name / "adapter_config.json").write_text(config or json.dumps(source))
        (adapters / name / "adapter_model.safetensors").write_bytes(
            (files / "adapters" / "b" / "adapter_model.safetensors").read_bytes())
    app = make_app(files, adapter_dir=str(adapters))
    with running(app) as url:
        for name, words in [("regex", "not a valid regular expression"), ("deep", "nested too deeply")]:
            loaded = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}, timeout=30)
            asked = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "cat"}, timeout=30)
            for response in (loaded, asked):
                assert response.status_code == 400
                error = error_of(response)
                assert error["code"] == "invalid_adapter" and words in error["message"]
        assert app.state.registry.loaded() == ["a"]


# --- metrics and logs ----------------------------------------------------------------------------------

def test_metrics_count_requests_tokens_and_latencies(files):
    app = make_app(files)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        answers = [client.completions.create(model=m, prompt=p, max_tokens=6, temperature=0)
                   for m, p in [("b", PROMPTS[0]), ("b", PROMPTS[1]), ("tiny", PROMPTS[2])]]
        streamed = list(client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="cat")
        usages = [a.usage for a in answers] + [streamed[-1].usage]

        def requests(route, status, adapter):
            key = ("lorakit_requests_total", (("adapter", adapter), ("route", route), ("status", status)))
            return metric_samples(url).get(key, 0)

        wait_until(lambda: requests("/v1/completions", "404", "") == 1)  # counted once the answer is sent
        samples = metric_samples(url)
        assert requests("/v1/completions", "200", "b") == 2
        assert requests("/v1/completions", "200", "tiny") == requests("/v1/completions", "200", "a") == 1

        def total(name):
            return sum(v for (n, _), v in samples.items() if n == name)

        assert total("lorakit_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
        assert total("lorakit_generation_tokens_total") == sum(u.completion_tokens for u in usages)
        assert samples[("lorakit_generation_tokens_total", (("adapter", "b"),))] == \
            sum(a.usage.completion_tokens for a in answers[:2])
        assert samples[("lorakit_time_to_first_token_seconds_count", ())] == 4
        assert samples[("lorakit_inter_token_latency_seconds_count", ())] == sum(u.completion_tokens - 1 for u in usages)
        assert samples[("lorakit_adapters_loaded", ())] == len(app.state.registry.loaded()) == 2
        assert samples[("lorakit_queue_depth", ())] == samples[("lorakit_running_requests", ())] == 0
        assert samples[("lorakit_kv_cache_bytes", ())] == app.state.engine.kv_cache_bytes > 0
        other_app = make_app(files)  # its own registry: nothing counted, no clash with this one
        assert other_app.state.metrics.registry is not app.state.metrics.registry


def test_requests_arriving_together_share_one_prefill_as_metrics_show(files):
    app = make_app(files, batch_wait=0.5)  # generous: arrivals on a busy machine may be spread out
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        jobs = [("b", PROMPTS[0]), ("c", PROMPTS[1]), ("tiny", PROMPTS[2]), ("b", PROMPTS[1])]
        client.completions.create(model="c", prompt="cat", max_tokens=1)  # load b and c first: no wait on disk
        client.completions.create(model="b", prompt="cat", max_tokens=1)
        before = metric_samples(url)
        for answer, (model, prompt) in zip(ask_together(client, jobs, max_tokens=5), jobs):
            assert answer.choices[0].text == expected(files, model, ids_of(prompt), 5)[0]
        after = metric_samples(url)

    def change(name):
        return after[(name, ())] - before[(name, ())]

    assert change("lorakit_prefill_batch_size_count") == 1 and change("lorakit_prefill_batch_size_sum") == 4
    bucket = {le: after[("lorakit_prefill_batch_size_bucket", (("le", le),))] -
              before[("lorakit_prefill_batch_size_bucket", (("le", le),))] for le in ("2", "4")}
    assert bucket == {"2": 0, "4": 1}  # one forward of 4 (not 1 + 3, nor 2 + 2)
    assert change("lorakit_decode_batch_size_count") >= 4  # 5 tokens: a prefill, then decodes of all 4


def log_lines(caplog, event="request"):
    """The JSON lines on "lorakit.serve" at INFO of one `event` ("request": one line per request; "ready")."""
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lorakit.serve" and r.levelname == "INFO"]
    return [line for line in lines if line.get("event") == event]


def test_startup_allocates_the_kv_cache_and_says_how_big(files, caplog):
    caplog.set_level("INFO", logger="lorakit.serve")
    app = make_app(files)
    with running(app) as url:
        (ready,) = log_lines(caplog, "ready")
        assert ready["kv_cache_bytes"] == app.state.engine.kv_cache_bytes > 0  # before any request
        assert metric_samples(url)[("lorakit_kv_cache_bytes", ())] == ready["kv_cache_bytes"]
        assert log_lines(caplog) == []  # no request yet, so no request line


def test_one_json_log_line_per_request_without_the_prompt(files, caplog):
    caplog.set_level("INFO", logger="lorakit.serve")
    secret = "the happy moon"
    with running(make_app(files)) as url:
        ok = httpx.post(url + "/v1/completions", json={"model": "b", "prompt": secret, "max_tokens": 4,
                                                       "temperature": 0}, timeout=30)
        bad = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": secret, "n": 3}, timeout=30)
        wait_until(lambda: len(log_lines(caplog)) == 2)
    first, second = log_lines(caplog)
    usage = ok.json()["usage"]
    assert first["request_id"] == ok.headers["x-request-id"] and second["request_id"] == bad.headers["x-request-id"]
    assert (first["route"], first["status"], first["adapter"], first["finish_reason"]) == \
        ("/v1/completions", 200, "b", "length")
    assert (first["prompt_tokens"], first["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert first["latency_s"] >= first["ttft_s"] > 0
    assert (second["status"], second["adapter"], second["completion_tokens"]) == (400, None, 0)
    assert not any("moon" in r.getMessage() for r in caplog.records)


def test_log_prompts_puts_the_prompt_in_the_line(files, caplog):
    caplog.set_level("INFO", logger="lorakit.serve")
    with running(make_app(files, log_prompts=True)) as url:
        httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "the happy moon", "max_tokens": 2},
                   timeout=30)
        messages = [{"role": "user", "content": "a sad star"}]
        httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 2},
                   timeout=30)
        wait_until(lambda: len(log_lines(caplog)) == 2)
    assert [line["prompt"] for line in log_lines(caplog)] == ["the happy moon", messages]


# --- registry races ------------------------------------------------------------------------------------

def stall_leaving_the_engine(app, monkeypatch):
    """Each request's `on_done` (the engine letting it go) waits for the returned event list's
    latest event before it runs: the answer must not depend on that call having happened."""
    engine, gates = app.state.engine, []
    submit = engine.submit_async

    def stalled_submit(prompt_ids, adapter, params, on_done=None):
        gate = threading.Event()
        gates.append(gate)
        return submit(prompt_ids, adapter, params, on_done=lambda: (gate.wait(30), on_done and on_done()))

    monkeypatch.setattr(engine, "submit_async", stalled_submit)
    return gates


def test_an_answer_arrives_after_its_pin_and_place_are_given_back(files, monkeypatch):
    app = make_app(files)
    with running(app) as url:
        gates = stall_leaving_the_engine(app, monkeypatch)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        try:
            for stream in (False, True, False, True):
                assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "d"},
                                  timeout=30).status_code == 200
                answer = client.completions.create(model="fresh", prompt=PROMPTS[0], max_tokens=3, stream=stream)
                if stream:
                    assert list(answer)[-1].choices[0].finish_reason
                # the engine has not let the request go yet (it waits on its gate), yet:
                assert app.state.registry.pins("fresh") == 0 and app.state.admission.admitted == 0
                gates[-1].set()
                unload = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}, timeout=30)
                assert unload.status_code == 200, unload.text
        finally:
            for gate in gates:
                gate.set()


def test_more_adapters_in_demand_than_slots_wait_for_one(files):
    app = make_app(files, max_loaded=1, max_batch_size=2)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        jobs = [(model, prompt) for model in ["a", "b", "c", "d"] for prompt in PROMPTS[:2]]
        for answer, (model, prompt) in zip(ask_together(client, jobs, max_tokens=6, timeout=120), jobs):
            assert answer.choices[0].text == expected(files, model, ids_of(prompt), 6)[0], model
        assert len(app.state.registry.loaded()) == 1 and app.state.registry.waiting() == 0
