"""Mixed-adapter batches: every row equals what it gets alone with its adapter."""

import pytest
import torch

from lorakit import BASE_ADAPTER, LoraConfig, get_peft_model
from lorakit.layers import AdapterRouting

from conftest import tiny_bert_classifier, tiny_llama


def three_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules="all-linear"))
    model.add_adapter("c", LoraConfig(r=8, init_lora_weights=False, target_modules=["embed_tokens", "o_proj"]))
    return model.eval()


def alone(model, name, ids):
    with torch.no_grad():
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                return model(ids).logits
        model.set_adapter(name)
        return model(ids).logits


def test_each_row_matches_its_adapter_alone():
    model = three_adapters()
    ids = torch.randint(0, 100, (6, 7), generator=torch.Generator().manual_seed(0))
    names = ["b", "a", BASE_ADAPTER, "c", "a", "b"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone(model, name, ids[row:row + 1])[0], rtol=1e-5, atol=1e-5)


def test_generate_with_mixed_adapters_matches_single_runs():
    model = three_adapters()
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["c", BASE_ADAPTER, "a"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        for row, name in enumerate(names):
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    single = model.generate(input_ids=ids[row:row + 1], **kw)
            else:
                model.set_adapter(name)
                single = model.generate(input_ids=ids[row:row + 1], **kw)
            assert torch.equal(mixed[row], single[0])


def test_modules_to_save_route_per_row():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"],
                                                              init_lora_weights=False), adapter_name="x")
    model.add_adapter("y", LoraConfig(target_modules=["value"], modules_to_save=["classifier"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["y"].weight.add_(1.0)
    model.eval()
    ids = torch.randint(0, 100, (3, 6))
    names = ["y", "x", BASE_ADAPTER]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone(model, name, ids[row:row + 1])[0], rtol=1e-5, atol=1e-5)


def test_errors():
    model = three_adapters()
    ids = torch.randint(0, 100, (2, 4))
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        model(ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="2 rows"):
        model(ids, adapter_names=["a", "b", "c"])
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged"):
        model(ids, adapter_names=["a", "b"])


def test_routing_groups_rows_once_and_repeats_for_beams():
    routing = AdapterRouting(["a", BASE_ADAPTER, "a", "b"])
    groups = routing.groups(4, torch.device("cpu"))
    assert [(n, r.tolist()) for n, r in groups] == [("a", [0, 2]), ("b", [3])]
    assert routing.groups(4, torch.device("cpu")) is groups  # built once per batch shape
    assert [(n, r.tolist()) for n, r in routing.groups(8, torch.device("cpu"))] == [("a", [0, 1, 4, 5]), ("b", [6, 7])]
