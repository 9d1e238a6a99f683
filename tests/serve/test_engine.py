"""The serving engine: batched steps equal the library's own generate (sliding-window and alternating
models, padded rows, rows joining later), prompts arriving together share one prefill, rows fail and stop alone."""

import asyncio
import inspect
import threading
import time

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from lorakit import BASE_ADAPTER, AdapterLoadError, LoraConfig, PeftModel, get_peft_model
from lorakit.adapter_format import read_adapter
from lorakit.layers import LoraLayer
from lorakit.serve.engine import Engine, Output, SamplingParams, sample_token
from lorakit.serve.kv_cache import SlotCache

from conftest import tiny_gpt2, tiny_llama

EOS = 2  # LlamaConfig's default eos_token_id
GREEDY = dict(temperature=0.0)


class WordTokenizer:
    """Token id i decodes to the word "w<i>"; the end-of-sequence id is special and skipped."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == EOS))


class Collect:
    """Receives one request's Outputs (engine thread) and counts on_done calls."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.released = 0
        self.done = threading.Event()

    def emit(self, out):
        self.outputs.append(out)

    def on_done(self):
        self.released += 1
        self.done.set()

    def wait(self):
        assert self.done.wait(30), "request did not finish"
        return self

    @property
    def tokens(self):
        return [t for out in self.outputs for t in out.token_ids]

    @property
    def text(self):
        return "".join(out.text for out in self.outputs)

    @property
    def last(self):
        return self.outputs[-1]


def base_model():
    # initializer_range 0.3: logits far apart, so argmax is not decided by float rounding
    return tiny_llama(0, initializer_range=0.3, max_position_embeddings=128)


def adapters_model():
    torch.manual_seed(1)
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"))
    model.add_adapter("c", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["embed_tokens", "o_proj"]))
    return model.eval()


def reference(model, adapter, prompt, max_new_tokens):
    """The library's own greedy answer for one prompt with one adapter."""
    ids = torch.tensor([prompt])
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if adapter == BASE_ADAPTER:
            with model.disable_adapter():
                out = model.generate(ids, **kw)
        elif isinstance(model, PeftModel):
            model.set_adapter(adapter)
            out = model.generate(ids, **kw)
        else:
            out = model.generate(ids, **kw)
    return out[0, len(prompt):].tolist()


def submit(engine, prompt, adapter, **params):
    collect = Collect()
    engine.submit(prompt, adapter, SamplingParams(**params), collect.emit, collect.on_done)
    return collect


PROMPTS = [[5, 17, 42, 8], [61, 3, 9, 27, 33, 70, 12], [88]]


def test_all_running_rows_share_one_forward_and_equal_generate():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=16)
    jobs = [(name, prompt) for name in ["a", "b", BASE_ADAPTER, "c"] for prompt in PROMPTS]
    results = [submit(engine, prompt, name, max_tokens=10, **GREEDY) for name, prompt in jobs]  # all queued before start
    engine.start()
    for result in results:
        result.wait()
    engine.stop()
    answers = {}
    for (name, prompt), result in zip(jobs, results):
        expected = reference(model, name, prompt, 10)
        assert result.tokens == expected, (name, prompt)
        assert result.last.finish_reason == ("stop" if expected[-1] == EOS else "length")
        assert result.last.completion_tokens == len(expected) and result.last.prompt_tokens == len(prompt)
        assert result.released == 1
        answers[name, tuple(prompt)] = expected
    assert len({tuple(answers[n, tuple(PROMPTS[0])]) for n in ["a", "b", BASE_ADAPTER, "c"]}) == 4  # adapters matter
    assert engine.stats.prefills == len(jobs)
    still_running = sum(1 for name, prompt in jobs if answers[name, tuple(prompt)][0] != EOS)
    assert max(engine.stats.decode_batch_sizes) == still_running  # every row in the same forward


def test_new_requests_join_between_steps():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=4)
    engine.eos_token_ids = set()  # run to max_tokens, so the two overlap for sure
    order = []
    late = {}

    class First(Collect):
        def emit(self, out):
            super().emit(out)
            order.append("first")
            if len(self.outputs) == 3:  # submitted from inside a step: joins at the next boundary
                late["b"] = submit(engine, PROMPTS[1], "b", max_tokens=6, **GREEDY)

    first = First()
    engine.submit(PROMPTS[0], "a", SamplingParams(max_tokens=12, **GREEDY), first.emit, first.on_done)
    engine.start()
    first.wait()
    late["b"].wait()
    engine.stop()
    model.generation_config.eos_token_id = None
    assert first.tokens == reference(model, "a", PROMPTS[0], 12)
    assert late["b"].tokens == reference(model, "b", PROMPTS[1], 6)
    assert engine.stats.decode_batch_sizes[1] >= 2 and engine.stats.decode_batch_sizes[2] >= 5
    assert order.count("first") == 12 and order[-1] == "first"  # "a" kept going while "b" ran


def test_max_batch_size_queues_the_rest():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=2)
    results = [submit(engine, PROMPTS[i % 3], "ab"[i % 2], max_tokens=5, **GREEDY) for i in range(5)]
    engine.start()
    for result in results:
        result.wait()
    engine.stop()
    assert max(engine.stats.decode_batch_sizes) == 2
    for i, result in enumerate(results):
        assert result.tokens == reference(model, "ab"[i % 2], PROMPTS[i % 3], 5)


def test_a_failing_row_fails_alone():
    model = adapters_model()
    real_forward = model.forward

    def forward(*args, adapter_names=None, **kwargs):  # adapter "c" breaks in decode steps only
        if adapter_names and "c" in adapter_names and kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("boom")
        return real_forward(*args, adapter_names=adapter_names, **kwargs)

    model.forward = forward
    engine = Engine(model, WordTokenizer())
    jobs = [("a", PROMPTS[0]), ("c", PROMPTS[1]), (BASE_ADAPTER, PROMPTS[2])]
    results = [submit(engine, prompt, name, max_tokens=8, **GREEDY) for name, prompt in jobs]
    engine.start()
    for result in results:
        result.wait()
    engine.stop()
    model.forward = real_forward
    broken = results[1]
    assert isinstance(broken.last.error, RuntimeError) and "boom" in str(broken.last.error)
    assert broken.last.finish_reason is None and len(broken.tokens) == 1  # its prefill token, then the failure
    for (name, prompt), result in zip(jobs, results):
        assert result.released == 1
        if name != "c":
            assert result.last.error is None
            assert result.tokens == reference(model, name, prompt, 8)


def test_a_slot_given_to_a_new_request_holds_nothing_of_the_last_one():
    """A request whose adapter gives non-finite keys and values leaves them in its slot's columns;
    the next request in that slot (masked over those columns) still equals generate."""
    model = adapters_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and "a" in module.adapters:
                module.lora_B["a"].weight.fill_(float("nan"))
    engine = Engine(model, WordTokenizer(), max_batch_size=2)
    engine.eos_token_ids = set()  # run to max_tokens, so the long request outlives the others
    late = {}

    class Poisoned(Collect):
        def on_done(self):  # on the engine thread: the next request takes the freed slot at the next step
            late["base"] = submit(engine, PROMPTS[0], BASE_ADAPTER, max_tokens=5, **GREEDY)
            super().on_done()

    long = submit(engine, PROMPTS[1], BASE_ADAPTER, max_tokens=16, **GREEDY)
    poisoned = Poisoned()
    engine.submit(PROMPTS[2], "a", SamplingParams(max_tokens=2, **GREEDY), poisoned.emit, poisoned.on_done)
    engine.start()
    poisoned.wait()
    late["base"].wait()
    long.wait()
    engine.stop()
    model.generation_config.eos_token_id = None
    assert long.tokens == reference(model, BASE_ADAPTER, PROMPTS[1], 16)
    assert late["base"].tokens == reference(model, BASE_ADAPTER, PROMPTS[0], 5)


def test_finish_reasons_and_stop_strings():
    model = adapters_model()
    engine = Engine(model, WordTokenizer())
    engine.eos_token_ids = set()
    engine.start()
    model_answer = submit(engine, PROMPTS[1], "b", max_tokens=6, **GREEDY).wait()
    assert model_answer.last.finish_reason == "length" and len(model_answer.tokens) == 6

    full = model_answer.text
    stop = f"w{model_answer.tokens[2]}"
    stopped = submit(engine, PROMPTS[1], "b", max_tokens=6, stop=(stop, "never-there"), **GREEDY).wait()
    assert stopped.last.finish_reason == "stop"
    assert stopped.text == full[:full.index(stop)]

    engine.eos_token_ids = {model_answer.tokens[0]}
    eos = submit(engine, PROMPTS[1], "b", max_tokens=6, **GREEDY).wait()
    assert eos.last.finish_reason == "stop" and eos.tokens == model_answer.tokens[:1]
    engine.stop()


def test_async_outputs_reach_each_event_loop_once_per_step_in_order():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=8)
    engine.eos_token_ids = set()
    jobs = [(name, prompt) for name in ["a", "b"] for prompt in PROMPTS]

    async def run():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wakeups.append(args[0]), real(*args))[1]
        streams = [engine.submit_async(prompt, name, SamplingParams(max_tokens=6, **GREEDY)) for name, prompt in jobs]
        engine.start()
        answers = []
        for stream in streams:
            answers.append([out async for out in stream])
        return answers, wakeups

    answers, wakeups = asyncio.run(run())
    engine.stop()
    model.generation_config.eos_token_id = None
    for (name, prompt), outputs in zip(jobs, answers):
        assert [t for out in outputs for t in out.token_ids] == reference(model, name, prompt, 6)
        assert [out.completion_tokens for out in outputs] == list(range(1, 7))  # in order, none lost
    # 6 rows x 6 tokens, handed over per step (a prefill, then 5 decodes), not per token
    assert len(wakeups) == 6 < len(jobs) * 6


def test_two_event_loops_get_their_own_outputs_and_one_on_done_each():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=8)
    engine.eos_token_ids = set()
    engine.start()
    results = {}

    def client(name, prompt):  # its own thread and event loop
        async def run():
            seen = []
            order = []
            stream = engine.submit_async(prompt, name, SamplingParams(max_tokens=5, **GREEDY),
                                         on_done=lambda: order.append("done"))
            async for out in stream:
                seen.append(out)
            await asyncio.sleep(0.05)  # on_done may be called on the engine thread just after
            return seen, order
        results[name] = asyncio.run(run())

    threads = [threading.Thread(target=client, args=job) for job in [("a", PROMPTS[0]), ("b", PROMPTS[1])]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    engine.stop()
    model.generation_config.eos_token_id = None
    for name, prompt in [("a", PROMPTS[0]), ("b", PROMPTS[1])]:
        seen, order = results[name]
        assert [t for out in seen for t in out.token_ids] == reference(model, name, prompt, 5)
        assert order == ["done"]


def test_a_request_whose_event_loop_closed_is_cancelled():
    engine = Engine(adapters_model(), WordTokenizer())
    engine.eos_token_ids = set()

    async def submit_and_leave():
        return engine.submit_async(PROMPTS[0], "a", SamplingParams(max_tokens=10_000, **GREEDY))

    asyncio.run(submit_and_leave())  # the loop is closed now: nobody can read the outputs
    engine.start()
    deadline = time.monotonic() + 30
    while engine.stats.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.cancelled == 1 and engine.num_running == 0 and engine.alive
    engine.stop()


def test_batch_wait_prefills_a_burst_together():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=8, batch_wait=0.5)
    engine.start()
    results = []
    for i in range(4):  # arriving 50 ms apart, each within batch_wait of the one before
        results.append(submit(engine, PROMPTS[i % 3], "ab"[i % 2], max_tokens=4, **GREEDY))
        time.sleep(0.05)
    for result in results:
        result.wait()
    engine.stop()
    assert dict(engine.stats.prefill_batch_sizes) == {4: 1}
    for i, result in enumerate(results):
        assert result.tokens == reference(model, "ab"[i % 2], PROMPTS[i % 3], 4)
    with pytest.raises(ValueError, match="batch_wait"):
        Engine(model, WordTokenizer(), batch_wait=-1)
    with pytest.raises(ValueError, match="kv_chunk"):
        Engine(model, WordTokenizer(), kv_chunk=0)
    with pytest.raises(ValueError, match="kv_shrink_after"):
        Engine(model, WordTokenizer(), kv_shrink_after=0)


def test_warm_up_allocates_the_cache_and_changes_no_answer():
    model = adapters_model()
    engine = Engine(model, WordTokenizer(), max_batch_size=4)
    engine.start()
    assert engine.kv_cache_bytes == 0  # allocated by the first forward
    size = engine.warm_up().result(30)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert size == engine.kv_cache_bytes == \
        config.num_hidden_layers * 2 * 4 * config.num_key_value_heads * 256 * head_dim * 4  # layers, k+v, slots, fp32
    result = submit(engine, PROMPTS[1], "b", max_tokens=6, **GREEDY).wait()
    engine.stop()
    assert result.tokens == reference(model, "b", PROMPTS[1], 6)


def test_cancel_waiting_and_running_requests():
    engine = Engine(adapters_model(), WordTokenizer())
    engine.eos_token_ids = set()
    waiting = Collect()
    handle = engine.submit(PROMPTS[0], "a", SamplingParams(max_tokens=5), waiting.emit, waiting.on_done)
    handle.cancel()

    class CancelAfterTwo(Collect):
        def emit(self, out):
            super().emit(out)
            if len(self.outputs) == 2:
                running_handle.cancel()

    running = CancelAfterTwo()
    running_handle = engine.submit(PROMPTS[1], "b", SamplingParams(max_tokens=50), running.emit, running.on_done)
    engine.start()
    waiting.wait()
    running.wait()
    engine.stop()
    assert waiting.outputs == [] and waiting.released == 1
    assert len(running.outputs) == 2 and running.last.finish_reason is None and running.released == 1
    assert engine.stats.cancelled == 2 and engine.stats.prefills == 1


def test_attach_and_detach_adapters_between_steps(tmp_path):
    torch.manual_seed(3)
    trained = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                      target_modules="all-linear"))
    trained.save_pretrained(tmp_path / "x")
    get_peft_model(tiny_llama(0, hidden_size=16, num_attention_heads=2, num_key_value_heads=1),  # another base
                   LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "other")

    base = base_model()
    engine = Engine(base, WordTokenizer())
    engine.start()
    base_answer = submit(engine, PROMPTS[0], BASE_ADAPTER, max_tokens=6, **GREEDY).wait().tokens

    engine.attach_adapter("x", *read_adapter(tmp_path / "x")).result(timeout=30)
    with_x = submit(engine, PROMPTS[0], "x", max_tokens=6, **GREEDY).wait().tokens
    assert with_x == reference(PeftModel.from_pretrained(base_model(), str(tmp_path / "x")), "default", PROMPTS[0], 6)
    assert with_x != base_answer

    with pytest.raises(AdapterLoadError, match="shape mismatches"):
        engine.attach_adapter("y", *read_adapter(tmp_path / "other")).result(timeout=30)
    assert {n for m in base.modules() if isinstance(m, LoraLayer) for n in m.adapters} == {"x"}

    gate = threading.Event()
    engine.run_between_steps(gate.wait)  # hold the engine between two steps
    queued = submit(engine, PROMPTS[1], "x", max_tokens=3, **GREEDY)
    detach_in_use = engine.detach_adapter("x")
    gate.set()
    with pytest.raises(RuntimeError, match="used by 1 request"):
        detach_in_use.result(timeout=30)
    assert queued.wait().last.error is None

    engine.detach_adapter("x").result(timeout=30)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())  # the last adapter gone: plain model again
    assert submit(engine, PROMPTS[0], BASE_ADAPTER, max_tokens=6, **GREEDY).wait().tokens == base_answer
    unknown = submit(engine, PROMPTS[0], "x", max_tokens=2, **GREEDY).wait()
    assert "no adapter named 'x'" in str(unknown.last.error)
    engine.stop()


# --- every decoder transformers caches: sliding windows, alternating layers, padded rows --------------

def mistral(window=8):
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, sliding_window=window,
                           initializer_range=0.3)
    return MistralForCausalLM(config).eval()


def qwen2_sliding(window=8):
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, use_sliding_window=True,
                         sliding_window=window, max_window_layers=1, initializer_range=0.3)
    return Qwen2ForCausalLM(config).eval()


def gemma3_alternating(window=8):
    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, vocab_size=100, max_position_embeddings=128,
                              sliding_window=window, initializer_range=0.3, tie_word_embeddings=False,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma3ForCausalLM(config).eval()


def with_adapters(model):
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"))
    model.get_base_model().generation_config.eos_token_id = None  # every answer runs to max_tokens
    return model.eval()


def long_prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in (20, 5, 13, 9)]


def run_all(engine, jobs, max_tokens):
    """Submit every job before the engine starts (so they arrive together), wait for all."""
    results = [submit(engine, prompt, name, max_tokens=max_tokens, **GREEDY) for name, prompt in jobs]
    engine.start()
    for result in results:
        result.wait()
    engine.stop()
    return results


@pytest.mark.parametrize("make", [mistral, qwen2_sliding, gemma3_alternating])
def test_sliding_window_models_equal_generate_with_mixed_adapters(make):
    """Window 8, prompts up to 20 tokens + 10 new ones, padded together in one prefill and one decode
    batch with three adapters: each row equals `generate` of that adapter alone."""
    model = with_adapters(make())
    engine = Engine(model, WordTokenizer(), kv_chunk=8)  # the cache grows and moves columns as it goes
    engine.eos_token_ids = set()
    jobs = [(name, prompt) for name, prompt in zip(["a", "b", BASE_ADAPTER, "a"], long_prompts())]
    jobs += [("b", long_prompts()[0])]
    results = run_all(engine, jobs, 10)
    for (name, prompt), result in zip(jobs, results):
        assert result.last.error is None
        assert result.tokens == reference(model, name, prompt, 10), (name, len(prompt))
    assert engine.stats.prefill_batch_sizes == {len(jobs): 1}  # one prefill forward for all five prompts
    assert engine.stats.decode_batch_sizes == {len(jobs): 9}
    assert results[0].tokens != results[4].tokens  # the adapter matters past the window too


def test_sliding_window_rows_joining_later_equal_generate():
    """Requests join a running batch at different columns (moving the columns right for a longer
    prompt, left and growing when the cache is full); every answer equals its single run."""
    model = with_adapters(mistral(window=6))
    engine = Engine(model, WordTokenizer(), max_batch_size=3, kv_chunk=8, kv_shrink_after=0.05)
    engine.eos_token_ids = set()
    engine.start()
    size_at_8_columns = engine.warm_up().result(30)
    prompts = long_prompts()
    jobs = [("a", prompts[1], 30), ("b", prompts[0], 12), (BASE_ADAPTER, prompts[3], 8), ("a", prompts[2], 12),
            ("b", prompts[1], 5)]
    results = {}

    class Trigger(Collect):
        def emit(self, out):
            super().emit(out)
            step = len(self.outputs)
            for i, (name, prompt, n) in enumerate(jobs[1:], start=1):
                if step == 3 * i:  # from inside a step: joins at the next boundary
                    results[i] = submit(engine, prompt, name, max_tokens=n, **GREEDY)

    first = Trigger()
    engine.submit(jobs[0][1], jobs[0][0], SamplingParams(max_tokens=jobs[0][2], **GREEDY), first.emit, first.on_done)
    results[0] = first
    first.wait()
    for i in range(1, len(jobs)):
        results[i].wait()
    deadline = time.monotonic() + 30
    while engine.kv_cache_bytes != size_at_8_columns and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    for i, (name, prompt, n) in enumerate(jobs):
        assert results[i].last.error is None
        assert results[i].tokens == reference(model, name, prompt, n), i
    assert max(engine.stats.decode_batch_sizes) == 3
    assert engine.stats.kv_columns_peak > 8  # it grew,
    assert engine.kv_cache_bytes == size_at_8_columns  # and gave it back after kv_shrink_after idle


def test_gpt2_equals_generate():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, init_lora_weights=False, target_modules=["c_attn"]))
    model.get_base_model().generation_config.eos_token_id = None
    engine = Engine(model, WordTokenizer())
    engine.eos_token_ids = set()
    jobs = [("default", PROMPTS[0]), (BASE_ADAPTER, PROMPTS[1]), ("default", PROMPTS[2])]
    for (name, prompt), result in zip(jobs, run_all(engine, jobs, 6)):
        assert result.tokens == reference(model, name, prompt, 6)


def test_the_sliding_window_mask_counts_each_rows_own_tokens():
    """The mask transformers builds over the slot cache for a decode step of rows that start at
    different columns: each row sees exactly its last `window` tokens, never another row's columns."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = qwen2_sliding(window=4).config
    cache = SlotCache(config, slots=3, chunk=16)
    starts, t = [0, 7, 9], 10  # rows own columns [start, t]: 11, 4 and 2 tokens
    cache.plan(slice(0, 3), write_at=t, attend_from=min(starts))
    attention_mask = torch.tensor([[int(c >= s) for c in range(t + 1)] for s in starts])
    embeds = torch.zeros(3, 1, config.hidden_size)
    config._attn_implementation = "eager"
    # transformers renamed the cache argument (past_key_values -> cache) after 5.14
    cache_arg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    for build, window in [(create_sliding_window_causal_mask, 4), (create_causal_mask, None)]:
        mask = build(config=config, inputs_embeds=embeds, attention_mask=attention_mask, **{cache_arg: cache},
                     position_ids=torch.tensor([[t - s] for s in starts]))
        kv_length, kv_offset = cache.get_mask_sizes(1, cache.is_sliding.index(window is not None))
        assert mask.shape == (3, 1, 1, kv_length)
        for row, start in enumerate(starts):
            seen = [kv_offset + c for c in range(kv_length) if mask[row, 0, 0, c] == 0]  # eager: 0 = attend
            first = start if window is None else max(start, t - window + 1)
            assert seen == list(range(first, t + 1)), (row, window)


def test_refuses_layers_that_are_not_attention():
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match=r"full and sliding-window attention layers; this model has \['linear_attention'\]"):
        SlotCache(config, slots=2)


def test_layer_windows_read_per_layer_and_shared_kwargs(monkeypatch):
    """transformers 5.19+ gives one kwargs dict per layer, 5.14-5.18 one dict for all: the same windows."""
    from lorakit.serve import kv_cache

    config = gemma3_alternating(window=4).config
    per_layer = kv_cache.layer_windows(config)
    assert None in per_layer and 4 in per_layer  # alternating full and sliding layers
    real = kv_cache.get_layer_types_and_kwargs

    def shared(config):
        types, kwargs = real(config)
        return types, (kwargs if isinstance(kwargs, dict) else {"sliding_window": 4})

    monkeypatch.setattr(kv_cache, "get_layer_types_and_kwargs", shared)
    assert kv_cache.layer_windows(config) == per_layer


def test_an_older_transformers_is_named(monkeypatch):
    from lorakit.serve import kv_cache

    monkeypatch.setattr(kv_cache, "get_layer_types_and_kwargs", None)  # as on transformers < 5.14
    with pytest.raises(ValueError, match=r"needs transformers >= 5\.14"):
        SlotCache(tiny_llama().config, slots=2)


def test_sample_token():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(1, temperature=0.0), generator) == 1
    assert {sample_token(logits, SamplingParams(1, temperature=2.0, top_p=1e-6), generator) for _ in range(50)} == {1}
    probs = torch.tensor([0.5, 0.3, 0.2]).log()
    drawn = {sample_token(probs, SamplingParams(1, top_p=0.6), generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.6 so the second token stays; the third never
    first = [sample_token(probs, SamplingParams(1), torch.Generator().manual_seed(7)) for _ in range(20)]
    again = [sample_token(probs, SamplingParams(1), torch.Generator().manual_seed(7)) for _ in range(20)]
    assert first == again
