"""Every operation that changes a model (load, add, inject, merge, combine, unload, remove), made
to fail at its very last internal call, leaves the model bit-identical to before: structure,
adapters per wrapper, the active adapter, the registry, base and adapter weights, trainable flags
and outputs (`test_peft_model.snapshot`).

The failure is injected by counting the calls to that internal function in a dry run of the same
operation on an identical model, then raising at the last one.
"""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model, inject_adapter_in_model
from lorakit import adapter_format
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.model import LoraModel

from conftest import perturb_trainables, tiny_llama
from test_peft_model import assert_same, snapshot

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


class Injected(Exception):
    """The failure the tests inject."""


def two_adapters(same_rank: bool = False):
    """A model holding "first" (q, v; lm_head trained in full; active) and "second" (k, v), both
    trained-looking; with `same_rank` also "same" (q, v, first's rank)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"]))
    if same_rank:
        model.add_adapter("same", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainables(model)
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a flag set by hand
    return model


def calls(monkeypatch, owner, name: str, operation, make) -> int:
    """How many times `operation(make())` calls `owner.name`."""
    real, count = getattr(owner, name), [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    model = make()
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, counting)
        operation(model)
    return count[0]


def fail_at_last_call(monkeypatch, targets: list[tuple[object, str]], operation, make=two_adapters) -> None:
    """Run `operation` on a fresh model `make()` with the last call among `targets` raising
    `Injected`, and assert the model is as it was. Each target is (class or module, attribute)."""
    total = sum(calls(monkeypatch, owner, name, operation, make) for owner, name in targets)
    assert total > 0, "the operation never calls what the failure is injected into"
    model = make()
    before = snapshot(model, IDS)
    count = [0]
    for owner, name in targets:
        real = getattr(owner, name)

        def failing(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == total:
                raise Injected(f"injected at call {total}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)
    with pytest.raises(Injected):
        operation(model)
    monkeypatch.undo()
    assert_same(before, snapshot(model, IDS))


def save_second(tmp_path):
    folder = tmp_path / "third"
    source = get_peft_model(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj", "o_proj"],
                                                     modules_to_save=["lm_head"]))
    perturb_trainables(source, seed=11)
    source.save_pretrained(folder)
    return folder


WRAPPER_DELETES = [(LoraLayer, "delete_adapter"), (ModulesToSave, "delete_adapter")]


def test_a_load_failing_after_its_weights_are_in(monkeypatch, tmp_path):
    folder = save_second(tmp_path)
    fail_at_last_call(monkeypatch, [(adapter_format, "load_weights")], lambda m: m.load_adapter(str(folder), "third"))


def test_a_load_failing_as_it_registers_the_adapter(monkeypatch, tmp_path):
    folder = save_second(tmp_path)
    fail_at_last_call(monkeypatch, [(LoraModel, "set_adapter")], lambda m: m.load_adapter(str(folder), "third"))


@pytest.mark.parametrize("last", ["add_adapter", "set_adapter"])
def test_an_add_failing_at_its_last_step(monkeypatch, last):
    config = LoraConfig(r=2, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"])
    owner = ModulesToSave if last == "add_adapter" else LoraModel  # the last wrapper's add, the activation
    fail_at_last_call(monkeypatch, [(owner, last)], lambda m: m.add_adapter("third", config))


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's warnings about a second injection
def test_an_injection_failing_at_its_last_step(monkeypatch):
    config = LoraConfig(r=2, target_modules=["o_proj", "down_proj"])
    fail_at_last_call(monkeypatch, [(LoraModel, "set_adapter")],
                      lambda m: inject_adapter_in_model(config, m.get_base_model(), adapter_name="third"))
    fail_at_last_call(monkeypatch, [(LoraModel, "set_adapter")],
                      lambda m: get_peft_model(m.get_base_model(), config, adapter_name="third"))


@pytest.mark.parametrize("names", [None, ["first", "second"]])
def test_a_merge_failing_at_its_last_layer(monkeypatch, names):
    fail_at_last_call(monkeypatch, [(LoraLayer, "merge")], lambda m: m.merge_adapter(names))


def test_a_merge_and_unload_failing_as_it_unwraps_the_last_layer(monkeypatch):
    fail_at_last_call(monkeypatch, [(LoraModel, "replace_module")], lambda m: m.merge_and_unload())


def test_an_unload_failing_as_it_unwraps_the_last_layer(monkeypatch):
    fail_at_last_call(monkeypatch, [(LoraModel, "replace_module")], lambda m: m.unload())


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_a_combination_failing_at_its_last_copy(monkeypatch, kind):
    inputs = ["first", "same"] if kind == "linear" else ["first", "second"]  # linear: equal ranks only
    fail_at_last_call(monkeypatch, [(torch.nn.Module, "load_state_dict")],  # the modules_to_save copy, last
                      lambda m: m.add_weighted_adapter(inputs, [0.7, 0.3], "mix", combination_type=kind),
                      make=lambda: two_adapters(same_rank=True))


@pytest.mark.parametrize("operation", ["delete_adapter", "remove_adapter", "remove_active"])
def test_a_removal_failing_at_its_last_wrapper(monkeypatch, operation):
    def remove(m):
        if operation == "delete_adapter":
            m.delete_adapter("second")
        else:
            m.base_model.remove_adapter("first" if operation == "remove_active" else "second")

    fail_at_last_call(monkeypatch, WRAPPER_DELETES, remove)


def test_removing_the_active_adapter_failing_as_the_next_one_becomes_active(monkeypatch):
    fail_at_last_call(monkeypatch, [(LoraModel, "set_adapter")], lambda m: m.base_model.remove_adapter("first"))


def quantized_adapters():
    """A 4-bit model holding "first": q, v on the 4-bit layers, embed_tokens and lm_head float LoRA
    layers (merged in place, in that order), the final norm trained in full."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"],
                                                    modules_to_save=["norm"]),
                           adapter_name="first", quantize="nf4")
    perturb_trainables(model)
    return model


@pytest.mark.parametrize("last", ["replace_module", "merge"])
def test_a_quantized_merge_and_unload_failing_at_its_last_step(monkeypatch, last):
    owner = LoraModel if last == "replace_module" else LoraLayer  # unwrapping the last module; the float merge
    fail_at_last_call(monkeypatch, [(owner, last)], lambda m: m.merge_and_unload(), make=quantized_adapters)


def test_a_rolled_back_dora_merge_keeps_no_merge_state(monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    perturb_trainables(model)
    layers = [layer for _, layer in model.base_model.lora_layers()]
    real, seen = LoraLayer._merge_bias, []

    def failing(self, names, sign):
        seen.append(self)
        if len(seen) == len(layers):  # the last layer, after its DoRA norm was kept
            raise Injected("injected at the last layer's bias")
        return real(self, names, sign)

    before = snapshot(model, IDS)
    monkeypatch.setattr(LoraLayer, "_merge_bias", failing)
    with pytest.raises(Injected):
        model.merge_adapter()
    monkeypatch.undo()
    assert_same(before, snapshot(model, IDS))
    assert all(not layer.merged_adapters and layer.lora_magnitude_vector["default"].merged_norm is None
               for layer in layers)
    model.merge_adapter()  # and a later merge and unmerge work as on a fresh model
    model.unmerge_adapter()
    torch.testing.assert_close(snapshot(model, IDS)["logits"], before["logits"], atol=1e-5, rtol=1e-5)
