"""The adapter registry: names and paths checked, loads shared and off the engine, LRU that spares pinned adapters."""

import asyncio
import threading

import pytest
import torch

from lorakit import BASE_ADAPTER, AdapterLoadError, LoraConfig, get_peft_model
from lorakit.layers import LoraLayer
from lorakit.serve import registry as registry_module
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.registry import (
    AdapterInUseError,
    AdapterNameError,
    AdapterPathError,
    AdapterRegistry,
    UnknownModelError,
)

from conftest import tiny_llama


class IdTokenizer:
    eos_token_id = 2

    def decode(self, ids, **_):
        return " ".join(map(str, ids))


def write_adapter(path, seed, base=None):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base or tiny_llama(0), config)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """adapters/{a,b,c} good, adapters/bad malformed, adapters/otherbase for another model; outside/{y,z}."""
    root = tmp_path_factory.mktemp("registry")
    for seed, name in enumerate("abc"):
        write_adapter(root / "adapters" / name, seed)
    write_adapter(root / "outside" / "y", 8)
    write_adapter(root / "outside" / "z", 9)
    write_adapter(root / "adapters" / "otherbase", 5, base=tiny_llama(0, hidden_size=16, num_attention_heads=2,
                                                                      num_key_value_heads=1))
    (root / "adapters" / "bad").mkdir()
    (root / "adapters" / "bad" / "adapter_config.json").write_text("{not json")
    return root


def scenario(root, test, **kwargs):
    """Run `await test(registry, engine)` with a started engine on a tiny base model."""
    engine = Engine(kwargs.pop("model", None) or tiny_llama(0), IdTokenizer())
    engine.start()

    async def main():
        registry = AdapterRegistry(engine, base_name="tiny", adapter_dir=str(root / "adapters"), **kwargs)
        await test(registry, engine)

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def attached(engine):
    """Adapter names present in the engine's model, read from its LoRA layers."""
    return {name for m in engine._base.modules() if isinstance(m, LoraLayer) for name in m.adapters}


def test_names(root):
    async def test(registry, engine):
        assert await registry.acquire("tiny") == BASE_ADAPTER
        for bad in ["../a", "a/b", "a.b", "", BASE_ADAPTER]:
            with pytest.raises(AdapterNameError):
                await registry.acquire(bad)
        with pytest.raises(UnknownModelError, match="'nope' does not exist"):
            await registry.acquire("nope")
        with pytest.raises(AdapterNameError, match="base model's name"):
            await registry.load("tiny", "a")

    scenario(root, test)


def test_least_recently_used_idle_adapter_is_evicted(root):
    async def test(registry, engine):
        for name in ["a", "b", "a"]:
            registry.release(await registry.acquire(name))
        assert registry.loaded() == ["b", "a"]
        registry.release(await registry.acquire("c"))  # evicts b, the least recently used
        assert registry.loaded() == ["a", "c"] and attached(engine) == {"a", "c"}

        await registry.acquire("a")
        await registry.acquire("c")  # both pinned now
        waiting = asyncio.ensure_future(registry.acquire("b"))  # waits for a slot instead of failing
        while registry.waiting() == 0:
            await asyncio.sleep(0.01)
        assert not waiting.done() and attached(engine) == {"a", "c"}
        registry.release("c")  # from another thread in the server (the engine's): wakes the waiter
        assert await waiting == "b"  # "a" is older but pinned: "c" goes
        assert registry.loaded() == ["a", "b"] and attached(engine) == {"a", "b"} and registry.waiting() == 0
        assert registry.pins("a") == 1 and registry.pins("b") == 1

    scenario(root, test, max_loaded=2)


def test_concurrent_requests_share_one_load(root, monkeypatch):
    reads = []
    real_read = registry_module.adapter_format.read_adapter
    monkeypatch.setattr(registry_module.adapter_format, "read_adapter", lambda path: reads.append(path) or real_read(path))

    async def test(registry, engine):
        names = await asyncio.gather(*[registry.acquire("a") for _ in range(5)])
        assert names == ["a"] * 5 and len(reads) == 1 and registry.pins("a") == 5

    scenario(root, test)


def test_reading_files_does_not_hold_up_the_engine(root, monkeypatch):
    disk = threading.Event()
    real_read = registry_module.adapter_format.read_adapter
    monkeypatch.setattr(registry_module.adapter_format, "read_adapter", lambda path: disk.wait(30) and real_read(path))

    async def test(registry, engine):
        loading = asyncio.ensure_future(registry.acquire("b"))
        await asyncio.sleep(0.05)
        outputs = [out async for out in engine.submit_async([5, 6, 7], BASE_ADAPTER, SamplingParams(4, temperature=0))]
        assert outputs[-1].finished and outputs[-1].error is None  # the base request ran during the slow read
        assert not loading.done()
        disk.set()
        assert await loading == "b" and attached(engine) == {"b"}

    scenario(root, test)


def test_paths_must_stay_inside_the_adapter_dir(root):
    async def test(registry, engine):
        await registry.load("fresh", "c")  # relative: inside --adapter-dir
        with pytest.raises(AdapterPathError, match="outside --adapter-dir"):
            await registry.load("escape", "../outside/y")
        with pytest.raises(AdapterPathError, match="outside --adapter-dir"):
            await registry.load("escape", str(root / "outside" / "y"))
        await registry.load("z2", str(root / "outside" / "z"))  # given on the command line: allowed
        with pytest.raises(AdapterNameError, match="already loaded"):
            await registry.load("fresh", "a")
        assert registry.loaded() == ["fresh", "z2"]

    scenario(root, test, adapters={"z": str(root / "outside" / "z")})

    async def no_dir(registry, engine):
        with pytest.raises(AdapterPathError, match="disabled"):
            await registry.load("a", str(root / "adapters" / "a"))

    engine = Engine(tiny_llama(0), IdTokenizer())
    engine.start()
    try:
        asyncio.run(no_dir(AdapterRegistry(engine, base_name="tiny"), engine))
    finally:
        engine.stop()


def test_bad_adapters_are_refused_and_change_nothing(root):
    async def test(registry, engine):
        with pytest.raises(AdapterLoadError, match="not valid JSON"):
            await registry.acquire("bad")
        with pytest.raises(AdapterLoadError, match="shape mismatches"):
            await registry.acquire("otherbase")
        assert registry.loaded() == [] and attached(engine) == set()
        assert await registry.acquire("a") == "a"

    scenario(root, test)


def test_unload(root):
    async def test(registry, engine):
        await registry.acquire("a")
        with pytest.raises(AdapterInUseError, match="1 running request"):
            await registry.unload("a")
        registry.release("a")
        await registry.unload("a")
        assert registry.loaded() == [] and attached(engine) == set()
        assert await registry.acquire("a") == "a"  # an --adapter-dir adapter comes back by name

        await registry.load("fresh", "c")
        await registry.unload("fresh")
        with pytest.raises(UnknownModelError):  # loaded at run time: forgotten once unloaded
            await registry.acquire("fresh")
        with pytest.raises(UnknownModelError, match="not loaded"):
            await registry.unload("fresh")

    scenario(root, test)


def test_preloaded_and_resident_adapters(root):
    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="r")

    async def test(registry, engine):
        await registry.preload()
        assert registry.loaded() == ["r", "z"]
        registry.release(await registry.acquire("a"))  # one slot: "z" goes, resident "r" stays
        assert registry.loaded() == ["r", "a"] and attached(engine) == {"r", "a"}

    scenario(root, test, model=model, max_loaded=1, resident=["r"], adapters={"z": str(root / "outside" / "z")})


def test_unloading_an_evicted_run_time_adapter_forgets_it(root):
    async def test(registry, engine):
        await registry.load("fresh", "c")
        registry.release(await registry.acquire("a"))  # one slot: "fresh" is evicted, still known
        assert registry.loaded() == ["a"]
        await registry.unload("fresh")  # not a 404 that leaves it answering
        with pytest.raises(UnknownModelError):
            await registry.acquire("fresh")
        assert registry.loaded() == ["a"] and attached(engine) == {"a"}

    scenario(root, test, max_loaded=1)


def test_unload_waits_for_a_load_in_progress(root):
    async def test(registry, engine):
        loading = asyncio.ensure_future(registry.load("fresh", "c"))
        await asyncio.sleep(0)  # the load has started (its files are being read)
        await registry.unload("fresh")
        await loading
        assert registry.loaded() == [] and attached(engine) == set()
        with pytest.raises(UnknownModelError):
            await registry.acquire("fresh")

    scenario(root, test)


def test_a_failed_load_of_an_evicted_name_leaves_its_path(root):
    async def test(registry, engine):
        registry.release(await registry.acquire("z"))
        registry.release(await registry.acquire("a"))  # one slot: command-line "z" is evicted, still known
        await registry.load("fresh", "c")
        registry.release(await registry.acquire("a"))  # "fresh" evicted too, still known
        for name in ["z", "fresh"]:
            with pytest.raises(AdapterLoadError):
                await registry.load(name, "bad")  # not loaded now, so the load is tried, and fails
            registry.release(await registry.acquire(name))  # still answers from its own path
            assert registry.loaded() == [name]

    scenario(root, test, max_loaded=1, adapters={"z": str(root / "outside" / "z")})


def test_a_just_loaded_adapter_is_not_evicted_before_its_waiters_pin_it(root, monkeypatch):
    """Two slots, three adapters wanted at once: each request gets its adapter on the first load."""
    loads = []
    attach, ensure_loaded = AdapterRegistry._attach, AdapterRegistry._ensure_loaded

    async def counting(self, name, *args):
        loads.append(name)
        await attach(self, name, *args)

    async def slow_to_resume(self, name, path):
        await ensure_loaded(self, name, path)
        await asyncio.sleep(0.05)  # the other loads look for room before this waiter pins its adapter

    monkeypatch.setattr(AdapterRegistry, "_attach", counting)
    monkeypatch.setattr(AdapterRegistry, "_ensure_loaded", slow_to_resume)

    async def test(registry, engine):
        async def use(name):
            got = await registry.acquire(name)
            await asyncio.sleep(0.01)
            registry.release(got)

        await asyncio.gather(*(use(name) for name in "abc"))
        assert sorted(loads) == ["a", "b", "c"]  # none evicted and loaded again

    scenario(root, test, max_loaded=2)
