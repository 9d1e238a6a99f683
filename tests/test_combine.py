"""add_weighted_adapter's maths and errors, the combined adapter's config and files, `lorakit combine`."""

import json

import pytest
import torch

from lorakit import LoraConfig, PeftModel, cli, get_peft_model

from conftest import logits, make_tiny_model_dir, tiny_bert_classifier, tiny_llama

QV = ["q_proj", "v_proj"]


def two_adapters(make=tiny_llama, a=None, b=None):
    """A model with random adapters "a" (q, v; r=4, alpha=8) and "b" (v, up, embed; r=2, alpha=3)."""
    a = dict(r=4, lora_alpha=8, target_modules=QV) | (a or {})
    b = dict(r=2, lora_alpha=3, target_modules=["v_proj", "up_proj", "embed_tokens"]) | (b or {})
    model = get_peft_model(make(), LoraConfig(init_lora_weights=False, **a), adapter_name="a")
    model.add_adapter("b", LoraConfig(init_lora_weights=False, **b))
    with torch.no_grad():  # init False gives an embedding's factors N(0, 1): bring ΔW to O(0.1) as for Linear
        for name, p in model.named_parameters():
            if "lora_embedding" in name:
                p.mul_(0.1)
    return model


def weighted_sum(model, adapters, weights):
    """{path: Σ w_i ΔW_i} over the layers holding any of `adapters`."""
    out = {}
    for path, layer in model.base_model.lora_layers():
        terms = [w * layer.delta_weight(n) for n, w in zip(adapters, weights) if n in layer.adapters]
        if terms:
            out[path] = sum(terms)
    return out


def deltas(model, name):
    return {path: layer.delta_weight(name) for path, layer in model.base_model.lora_layers() if name in layer.adapters}


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -1.3]])
def test_cat_delta_is_the_weighted_sum_of_deltas(weights):
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
    expected, got = weighted_sum(model, ["a", "b"], weights), deltas(model, "mix")
    assert got.keys() == expected.keys() and len(got) == 7  # q, v, up in 2 layers + embed_tokens
    for path in got:
        torch.testing.assert_close(got[path], expected[path], rtol=0, atol=1e-6)
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.rank_pattern, config.use_rslora) == (6, 6, {}, False)
    assert config.target_modules == ["embed_tokens", "q_proj", "up_proj", "v_proj"]


def test_cat_with_rank_pattern_rslora_and_lora_bias_is_exact(ids):
    """Smaller ranks of a rank_pattern are zero-padded; lora_B biases add up as Σ w·s·b."""
    model = two_adapters(make=lambda: tiny_llama(attention_bias=True),
                         a=dict(rank_pattern={"q_proj": 2}, use_rslora=True, lora_bias=True),
                         b=dict(target_modules=["v_proj", "q_proj"]))
    weights = [0.5, 2.0]
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
    assert model.peft_config["mix"].r == 6 and model.peft_config["mix"].lora_bias
    expected = weighted_sum(model, ["a", "b"], weights)
    for path, delta in deltas(model, "mix").items():
        torch.testing.assert_close(delta, expected[path], rtol=0, atol=1e-6)
    # outputs: the combined adapter equals running both adapters' updates, weighted
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = sum(w * layer.lora_delta(x, n) for n, w in zip(["a", "b"], weights))
        torch.testing.assert_close(layer.lora_delta(x, "mix"), want, rtol=0, atol=1e-5)


def test_svd_error_falls_as_rank_grows_and_is_exact_at_full_rank():
    model = two_adapters()
    weights = [1.0, 0.5]
    expected = weighted_sum(model, ["a", "b"], weights)
    errors = []
    for rank in (1, 2, 4, 6):
        name = f"svd{rank}"
        model.add_weighted_adapter(["a", "b"], weights, name, combination_type="svd", svd_rank=rank)
        got = deltas(model, name)
        errors.append(sum((got[p] - expected[p]).norm() ** 2 for p in got).sqrt().item())
        assert model.peft_config[name].r == rank
    assert errors[0] > errors[1] > errors[2] > 1e-3  # ranks up to 6 (4 + 2) remain in v_proj
    assert errors[3] < 1e-5  # rank 6 >= the rank of every weighted sum


def test_svd_default_rank_is_the_largest_input_rank_and_clamp_bounds_factors():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "clamped", svd_clamp=0.5)
    assert model.peft_config["mix"].r == model.peft_config["clamped"].r == 4
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    a, b = layer.lora_A["mix"].weight, layer.lora_B["mix"].weight
    high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.5)  # PEFT's rule: ± the median entry
    torch.testing.assert_close(layer.lora_A["clamped"].weight, a.clamp(-high, high), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["clamped"].weight, b.clamp(-high, high), rtol=0, atol=1e-6)


def test_linear_refuses_different_ranks_and_is_exact_for_one_adapter():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"combination_type='linear' needs adapters of one rank, got ranks \[4, 2\]"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="linear")
    assert "mix" not in model.peft_config
    model.add_weighted_adapter(["a"], [-0.75], "scaled", combination_type="svd")  # one adapter: always linear
    expected = weighted_sum(model, ["a"], [-0.75])
    for path, delta in deltas(model, "scaled").items():
        torch.testing.assert_close(delta, expected[path], rtol=0, atol=1e-6)


def test_linear_sums_the_factors_with_sqrt_weights():
    model = two_adapters(b=dict(r=4, target_modules=QV))
    model.add_weighted_adapter(["a", "b"], [0.6, -0.4], "mix", combination_type="linear")
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    wa, wb = 0.6 * layer.adapters["a"].scaling, -0.4 * layer.adapters["b"].scaling
    a = wa ** 0.5 * layer.lora_A["a"].weight - abs(wb) ** 0.5 * layer.lora_A["b"].weight
    b = wa ** 0.5 * layer.lora_B["a"].weight + abs(wb) ** 0.5 * layer.lora_B["b"].weight
    torch.testing.assert_close(layer.lora_A["mix"].weight, a, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["mix"].weight, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(adapters=["a", "b"], weights=[1.0]), "give one weight per adapter"),
    (dict(adapter_name="a"), "an adapter named 'a' already exists"),
    (dict(adapter_name="bad.name"), "invalid adapter name"),
    (dict(combination_type="ties"), "is not implemented"),
    (dict(combination_type="mean"), "combination_type must be one of"),
    (dict(density=0.5), "density applies to"),
    (dict(svd_rank=0), "svd_rank must be an integer >= 1"),
    (dict(adapters=["a", "a"], weights=[1.0, 1.0]), "lists an adapter twice"),
])
def test_bad_arguments_are_refused_and_add_nothing(kwargs, fragment):
    model = two_adapters()
    args = dict(adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix") | kwargs
    with pytest.raises(ValueError, match=fragment):
        model.add_weighted_adapter(**args)
    assert sorted(model.peft_config) == ["a", "b"]
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        model.add_weighted_adapter(["a", "zzz"], [1.0, 1.0], "mix")


def test_pissa_inputs_and_meta_models_are_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV, init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="keep PiSSA/OLoRA adapters on a base of their own"):
        model.add_adapter("b", LoraConfig(r=4, target_modules=QV))  # it would run on the PiSSA residual
    with pytest.raises(ValueError, match="convert it to a plain LoRA adapter first"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    with torch.device("meta"):
        base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV))
    with pytest.raises(ValueError, match="meta device"):
        model.add_weighted_adapter(["default"], [1.0], "mix")


def test_different_layer_selections_fall_back_to_full_paths(tmp_path, ids):
    model = two_adapters(a=dict(layers_to_transform=[0]), b=dict(target_modules=["v_proj"], layers_to_transform=[1]))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    config = model.peft_config["mix"]
    assert config.target_modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                     "model.layers.1.self_attn.v_proj"]
    assert config.layers_to_transform is None
    model.set_adapter("mix")
    expected = logits(model, ids)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    assert (logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix")), ids) - expected).abs().max() <= 1e-5


def test_modules_to_save_copy_comes_from_the_one_input_holding_it(ids):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                              init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"], init_lora_weights=False))
    head = model.base_model.model.classifier
    with torch.no_grad():
        head.modules_to_save["a"].weight.add_(1.0)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert model.peft_config["mix"].modules_to_save == ["classifier"]
    torch.testing.assert_close(head.modules_to_save["mix"].weight, head.modules_to_save["a"].weight)
    model.add_adapter("c", LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="each train their own copy of classifier"):
        model.add_weighted_adapter(["a", "c"], [1.0, 1.0], "mix2")


def test_combined_adapter_saves_and_loads_with_the_same_outputs(tmp_path, ids):
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, -0.5], "mix", combination_type="svd", svd_rank=3)
    model.set_adapter("mix")
    expected = logits(model, ids)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    data = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert (data["r"], data["lora_alpha"], data["init_lora_weights"]) == (3, 3, True)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix"))
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-5


# --- the command -------------------------------------------------------------------------------------

def test_combine_command_writes_a_loadable_adapter(tmp_path, capsys):
    base_dir = make_tiny_model_dir(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    load_base = lambda: AutoModelForCausalLM.from_pretrained(base_dir).eval()  # noqa: E731
    folders = []
    for i, (r, targets) in enumerate([(4, QV), (2, ["v_proj", "up_proj"])]):
        model = get_peft_model(load_base(), LoraConfig(r=r, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=False), adapter_name="x")
        model.save_pretrained(tmp_path / f"in{i}", selected_adapters=["x"])
        folders.append(str(tmp_path / f"in{i}" / "x"))
    out = tmp_path / "combined"
    argv = ["combine", ",".join(folders), str(out), "--weights", "1,0.5", "--combination-type", "cat"]
    assert cli.main(argv) == 0
    assert "combined 2 adapters (cat" in capsys.readouterr().out
    combined = PeftModel.from_pretrained(load_base(), str(out))
    assert combined.peft_config["default"].r == 6
    assert combined.peft_config["default"].base_model_name_or_path == str(base_dir)
    # same outputs as combining in memory
    reference = PeftModel.from_pretrained(load_base(), folders[0], adapter_name="p")
    reference.load_adapter(folders[1], adapter_name="q")
    reference.add_weighted_adapter(["p", "q"], [1.0, 0.5], "mix", combination_type="cat")
    reference.set_adapter("mix")
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    assert (logits(combined, ids) - logits(reference, ids)).abs().max() <= 1e-5
    assert cli.main(argv) == 2  # out is not empty now
    assert "exists and is not empty" in capsys.readouterr().err
