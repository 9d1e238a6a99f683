"""Behaviour of adapters on a model, in the spirit of PEFT's model-agnostic suite."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import AdapterLoadError, LoraConfig, PeftModel, get_peft_model
from lorakit.layers import LoraLayer

from conftest import logits, perturb_trainables, tiny_bert_classifier, tiny_gpt2, tiny_llama

QV = dict(target_modules=["q_proj", "v_proj"])


def random_adapter(**kw):
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **(QV | kw))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fresh_adapter_changes_nothing(ids):
    base_out = logits(tiny_llama(), ids)
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, **QV))
    torch.testing.assert_close(logits(model, ids), base_out, rtol=0, atol=0)


def test_paths_are_stable_and_base_is_frozen():
    model = get_peft_model(tiny_llama(), LoraConfig(**QV))
    names = {n for n, _ in model.named_parameters()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


def test_merge_unmerge_and_merge_and_unload_match_unmerged(ids):
    model = get_peft_model(tiny_llama(), random_adapter())
    expected = logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_unload_restores_the_base(ids):
    base_out = logits(tiny_llama(), ids)
    plain = get_peft_model(tiny_llama(), random_adapter()).unload()
    torch.testing.assert_close(logits(plain, ids), base_out, rtol=0, atol=0)


def test_disable_adapter_gives_base_outputs_even_when_merged(ids):
    base_out = logits(tiny_llama(), ids)
    model = get_peft_model(tiny_llama(), random_adapter())
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base_out, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_nan_and_merges_nothing(ids):
    model = get_peft_model(tiny_llama(), random_adapter())
    before = state(model)
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.self_attn.v_proj gives NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    assert not model.base_model.merged
    for k, v in state(model).items():
        if "lora_B" not in k:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_bf16_merge_is_as_close_as_bf16_allows(ids):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), random_adapter(target_modules="all-linear"))
    unmerged = logits(model, ids).float()
    merged = logits(model.merge_and_unload(), ids).float()
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_only_adapter_parameters_change_when_training(ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, **QV)).train()
    before = state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)


def test_bias_modes_choose_what_trains():
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "base_model.model.transformer.h.0.mlp.c_fc.bias" not in trainable
    model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.h.0.mlp.c_fc.bias" in trainable


def test_save_and_reload_after_reseed_is_identical(tmp_path, ids):
    model = get_peft_model(tiny_llama(), random_adapter())
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    torch.manual_seed(1234)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    assert not any(p.requires_grad or p.is_meta for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_several_adapters_switch_and_save_in_subfolders(tmp_path, ids):
    model = get_peft_model(tiny_llama(), random_adapter())
    out_default = logits(model, ids)
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False, target_modules=["k_proj"]))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, ids), out_default)
    model.set_adapter("other")
    out_other = logits(model, ids)
    assert not torch.allclose(out_other, out_default)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()

    fresh = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    fresh.load_adapter(str(tmp_path / "other"), adapter_name="other")
    torch.testing.assert_close(logits(fresh, ids), out_default)
    fresh.set_adapter("other")
    torch.testing.assert_close(logits(fresh, ids), out_other)

    with pytest.raises(ValueError, match="is the active adapter"):
        fresh.delete_adapter("other")
    fresh.set_adapter("default")
    fresh.merge_adapter()
    with pytest.raises(ValueError, match="is the active adapter"):
        fresh.delete_adapter("default")
    fresh.unmerge_adapter()
    fresh.merge_adapter(["other"])
    with pytest.raises(ValueError, match="merged into"):
        fresh.delete_adapter("other")
    fresh.unmerge_adapter()
    fresh.delete_adapter("other")
    assert list(fresh.peft_config) == ["default"]
    assert not any(".other" in n for n, _ in fresh.named_parameters())
    assert not any(isinstance(m, LoraLayer) for n, m in fresh.named_modules() if n.endswith("k_proj"))


def test_remove_adapter_takes_even_the_active_and_last_one(ids):
    base_out = logits(tiny_llama(), ids)
    model = get_peft_model(tiny_llama(), random_adapter())
    model.add_adapter("other", random_adapter(target_modules=["k_proj"]))
    model.remove_adapter("default")  # the active one: "other" takes over
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    model.remove_adapter("other")  # the last one: the base is plain again
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), base_out, rtol=0, atol=0)


def test_modules_to_save_train_and_reload(tmp_path):
    ids = torch.randint(0, 100, (2, 9))
    model = get_peft_model(tiny_bert_classifier(), random_adapter(target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected)
    plain = loaded.merge_and_unload()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_meta_device_counting_matches_peft_line(capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, LoraConfig(r=8, **QV))
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622")
    assert model.get_nb_trainable_parameters() == (4_194_304, 6_742_609_920)


# --- bad input: a clear error, and the model exactly as it was ------------------------------------

def saved_adapter(tmp_path, **kw) -> Path:
    model = get_peft_model(tiny_llama(), random_adapter(**kw))
    model.save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def assert_model_unchanged(model, before, module_types):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert [type(m) for m in model.modules()] == module_types


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"), "missing keys"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}),
     "unexpected keys"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 31)}),
     "shape mismatches"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight":
                         t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")}), "prefix"),
    (lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(float("nan")), "NaN"),
])
def test_bad_weights_fail_by_name_and_leave_model_as_it_was(tmp_path, edit, fragment):
    path = saved_adapter(tmp_path)
    edit_weights(path, edit)
    base = tiny_llama()
    before, types = state(base), [type(m) for m in base.modules()]
    with pytest.raises(AdapterLoadError, match=fragment):
        PeftModel.from_pretrained(base, str(path))
    assert_model_unchanged(base, before, types)

    model = get_peft_model(tiny_llama(), random_adapter(target_modules=["k_proj"]))
    before, types = state(model), [type(m) for m in model.modules()]
    with pytest.raises(AdapterLoadError, match=fragment):
        model.load_adapter(str(path), adapter_name="second")
    assert_model_unchanged(model, before, types)
    assert list(model.peft_config) == ["default"]


def test_adapter_for_another_base_is_refused(tmp_path):
    path = saved_adapter(tmp_path)
    other = tiny_llama(hidden_size=48, num_attention_heads=4)
    with pytest.raises(AdapterLoadError, match="shape mismatches .*another base"):
        PeftModel.from_pretrained(other, str(path))
    assert not any(isinstance(m, LoraLayer) for m in other.modules())


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"peft_type": "PREFIX_TUNING", "r": 8}), "only 'LORA'"),
    (json.dumps({"peft_type": "LORA", "r": 0}), "r must be an integer >= 1"),
])
def test_bad_config_is_refused(tmp_path, content, fragment):
    path = saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterLoadError, match=fragment):
        PeftModel.from_pretrained(tiny_llama(), str(path))


def test_unknown_config_fields_warn(tmp_path, ids):
    path = saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text()) | {"brand_new_option": 1}
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="brand_new_option"):
        PeftModel.from_pretrained(tiny_llama(), str(path))


def test_pickle_refused_unless_opted_in(tmp_path, ids):
    path = saved_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle.*allow_pickle=True"):
        PeftModel.from_pretrained(tiny_llama(), str(path))
    model = PeftModel.from_pretrained(tiny_llama(), str(path), allow_pickle=True)
    assert model.active_adapter == "default"


def test_missing_directory_and_bad_names(tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nope"))
    model = get_peft_model(tiny_llama(), LoraConfig(**QV))
    for bad in ["a/b", "..", "a.b", "", "__base__"]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            model.add_adapter(bad, LoraConfig(**QV))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(**QV))
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        model.set_adapter("x")


def test_saving_leaves_no_temporary_files_and_replaces_atomically(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), random_adapter())
    model.save_pretrained(tmp_path / "a")
    original = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import lorakit.files as files

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "_exchange", crash)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == original


@pytest.mark.parametrize("exchange", [True, False])
def test_saving_into_a_folder_keeps_what_else_it_holds(tmp_path, monkeypatch, exchange, ids):
    import lorakit.files as files

    if not exchange:  # where renameat2 is missing: each file replaced on its own
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    model = get_peft_model(tiny_llama(), random_adapter())
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    perturb_trainables(model)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "other", "tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    reloaded.load_adapter(str(tmp_path / "other"), "other")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.tmp-")] == []


def test_leftovers_of_a_killed_save_are_removed_by_the_next(tmp_path):
    (tmp_path / ".adapter.tmp-123-deadbeef").mkdir()
    (tmp_path / ".adapter.tmp-123-deadbeef" / "adapter_model.safetensors").write_bytes(b"half")
    get_peft_model(tiny_llama(), random_adapter()).save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]