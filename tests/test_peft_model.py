"""PEFT's public names in lorakit: configs, task classes, loading arguments, the state-dict helpers,
and the guarantee that a failed injection or load leaves the model exactly as it was."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import pytest
import torch
from torch import nn

import lorakit
from lorakit import (
    AdapterLoadError,
    ConfigError,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from lorakit.layers import Linear, LoraLayer, ModulesToSave

from conftest import logits, perturb_trainables, tiny_bert_classifier, tiny_llama


def qv(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw)


# --- names and configs ------------------------------------------------------------------------------

def test_task_and_peft_types_are_their_strings():
    config = LoraConfig(task_type=TaskType.CAUSAL_LM)
    assert config.task_type == "CAUSAL_LM" == TaskType.CAUSAL_LM and type(config.task_type) is str
    assert config.peft_type == PeftType.LORA
    assert json.loads(json.dumps(config.to_dict()))["task_type"] == "CAUSAL_LM"
    assert isinstance(config, PeftConfig)


def test_peft_config_from_pretrained_reads_a_folder_and_a_subfolder(tmp_path):
    model = get_peft_model(tiny_llama(), qv(task_type="CAUSAL_LM"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig) and config.r == 4 and config.task_type == "CAUSAL_LM"
    assert LoraConfig.from_pretrained(tmp_path, subfolder="other").r == 2
    assert PeftConfig.from_pretrained(tmp_path, revision="main").r == 4  # hub arguments are moot for a folder
    assert PeftConfig.from_pretrained(tmp_path, inference_mode=False).inference_mode is False
    config.save_pretrained(tmp_path / "copy")
    assert LoraConfig.from_pretrained(tmp_path / "copy") == config


@pytest.mark.parametrize("name, kwargs, match", [
    ("mistralai/some-adapter", {}, "never contacts the Hugging Face Hub"),
    ("missing-folder", {"revision": "v2"}, "given revision"),
    ("missing-folder", {}, "does not exist"),
])
def test_hub_ids_and_missing_folders_get_an_offline_error(tmp_path, name, kwargs, match):
    with pytest.raises(AdapterLoadError, match=match):
        PeftConfig.from_pretrained(str(tmp_path / name) if "/" not in name else name, **kwargs)
    with pytest.raises(AdapterLoadError, match=match):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / name) if "/" not in name else name, **kwargs)


def test_get_peft_model_returns_the_task_class_and_from_pretrained_follows_the_file(tmp_path):
    assert type(get_peft_model(tiny_llama(), qv())).__name__ == "PeftModel"
    model = get_peft_model(tiny_llama(), qv(task_type=TaskType.CAUSAL_LM))
    assert isinstance(model, lorakit.PeftModelForCausalLM)
    model.save_pretrained(tmp_path)
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), tmp_path), lorakit.PeftModelForCausalLM)
    classifier = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, task_type="SEQ_CLS"))
    assert isinstance(classifier, lorakit.PeftModelForSequenceClassification)


def test_forward_shows_the_base_signature_and_the_class_shows_the_label_names():
    from transformers.utils import find_labels

    model = get_peft_model(tiny_llama(), qv(task_type="CAUSAL_LM"))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "position_ids", "adapter_names"} <= set(params)
    assert find_labels(type(model)) == ["labels"]
    plain = get_peft_model(tiny_llama(), qv())
    assert "input_ids" in inspect.signature(plain.forward).parameters
    qa = lorakit.PeftModelForQuestionAnswering
    assert find_labels(qa) == ["start_positions", "end_positions"]


def test_task_class_forward_passes_arguments_by_name(ids):
    model = get_peft_model(tiny_llama(), qv(task_type="CAUSAL_LM"))
    perturb_trainables(model)
    mask = torch.ones_like(ids)
    by_position = model(ids, mask).logits
    torch.testing.assert_close(by_position, model(input_ids=ids, attention_mask=mask).logits)
    out = model(input_ids=ids, labels=ids)
    assert out.loss is not None and torch.isfinite(out.loss)
    mixed = model(input_ids=ids, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], by_position[0])


def test_active_adapters_peft_type_and_merge_and_unload_signature(ids):
    model = get_peft_model(tiny_llama(), qv())
    assert model.active_adapters == ["default"] and model.peft_type == "LORA"
    perturb_trainables(model)
    expected = logits(model, ids)
    merged = model.merge_and_unload(progressbar=True, safe_merge=True)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert "peft_config" not in merged.__dict__


# --- saved folders -------------------------------------------------------------------------------

def test_saved_target_modules_are_what_was_adapted(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear")).save_pretrained(tmp_path / "all")
    saved = json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"]
    assert len(saved) == 14 and "model.layers.1.mlp.down_proj" in saved and "lm_head" not in saved
    get_peft_model(tiny_llama(), LoraConfig()).save_pretrained(tmp_path / "default")
    assert json.loads((tmp_path / "default" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_model_card_names_base_and_settings_and_a_users_readme_is_kept(tmp_path):
    base = tiny_llama()
    base.name_or_path = "my-org/my-base"
    model = get_peft_model(base, qv(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nbase_model: my-org/my-base\nlibrary_name: peft\n")
    assert "| `r` | 4 |" in card and "from lorakit import PeftModel" in card and "from peft import PeftModel" in card
    (tmp_path / "README.md").write_text("my own notes\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own notes\n"


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        get_peft_model(tiny_llama(), qv()).save_pretrained(tmp_path / "new")       # a new folder, renamed whole
        get_peft_model(tiny_llama(), qv()).save_pretrained(tmp_path / "new")       # files replaced in place
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~mask
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (tmp_path / "new" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert [p.name for p in tmp_path.iterdir()] == ["new"]  # no temporary folder left


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    import lorakit.files as files

    real_open = open
    calls = []

    def failing_open(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", failing_open, raising=False)
    with pytest.raises(OSError, match="disk full"):
        get_peft_model(tiny_llama(), qv()).save_pretrained(tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_is_main_process_false_writes_nothing(tmp_path):
    get_peft_model(tiny_llama(), qv()).save_pretrained(tmp_path / "x", is_main_process=False)
    assert not (tmp_path / "x").exists()


# --- state-dict helpers ------------------------------------------------------------------------

def test_state_dict_helpers_round_trip_on_a_peft_model_and_an_injected_model(ids):
    model = get_peft_model(tiny_llama(), qv())
    perturb_trainables(model)
    state = get_peft_model_state_dict(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    fresh = get_peft_model(tiny_llama(), qv())
    result = set_peft_model_state_dict(fresh, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids))

    raw = inject_adapter_in_model(qv(), tiny_llama())
    assert not isinstance(raw, PeftModel) and isinstance(raw.model.layers[0].self_attn.q_proj, LoraLayer)
    assert {n for n, p in raw.named_parameters() if p.requires_grad} == {
        n for n, _ in raw.named_parameters() if ".lora_" in n}
    raw_state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    set_peft_model_state_dict(raw, raw_state)
    torch.testing.assert_close(logits(raw, ids), logits(model, ids))
    assert set(get_peft_model_state_dict(raw)) == set(raw_state)


def test_set_state_dict_refuses_a_wrong_shape_and_changes_nothing(ids):
    model = get_peft_model(tiny_llama(), qv())
    perturb_trainables(model)
    before = logits(model, ids)
    state = get_peft_model_state_dict(model)
    key = next(iter(state))
    state[key] = torch.zeros(3, 3)
    with pytest.raises(AdapterLoadError, match="shape"):
        set_peft_model_state_dict(model, state)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_load_adapter_into_an_existing_name_replaces_its_weights(tmp_path, ids):
    trained = get_peft_model(tiny_llama(), qv())
    perturb_trainables(trained)
    trained.save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), qv())
    param = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    model.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight is param  # in place
    torch.testing.assert_close(logits(model, ids), logits(trained, ids))
    assert param.requires_grad
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = logits(other, ids)
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        other.load_adapter(str(tmp_path), "default")
    torch.testing.assert_close(logits(other, ids), before, rtol=0, atol=0)


# --- failures leave the model exactly as it was -----------------------------------------------------

def snapshot(model: nn.Module, ids: torch.Tensor) -> dict:
    """Everything a failed operation must not change: structure, adapters per wrapper, registry,
    trainable flags (by parameter identity) and outputs."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return dict(
        types={p: type(m).__name__ for p, m in inner.named_modules()},
        adapters={p: sorted(m.adapters) for p, m in inner.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))},
        active={p: list(m.active_adapters) for p, m in inner.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))},
        weights={n: p.detach().clone() for n, p in inner.named_parameters()},
        registry=sorted(getattr(model, "peft_config", {})),
        flags={n: (id(p), p.requires_grad) for n, p in inner.named_parameters()},
        logits=logits(model, ids),
    )


def assert_same(before: dict, after: dict) -> None:
    for key in ("types", "adapters", "active", "registry", "flags"):
        assert after[key] == before[key], key
    assert after["weights"].keys() == before["weights"].keys()
    for name, weight in before["weights"].items():
        assert torch.equal(after["weights"][name], weight), name
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)


def fail_on_call(monkeypatch, n: int):
    """Make the n-th Linear.add_adapter call raise (a failure in the middle of an injection)."""
    real = Linear.add_adapter
    count = {"calls": 0}

    def add_adapter(self, *args, **kwargs):
        count["calls"] += 1
        if count["calls"] == n:
            raise RuntimeError("injected failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "add_adapter", add_adapter)


@pytest.mark.parametrize("name", ["second", "default"])
def test_a_failure_in_the_middle_of_an_injection_restores_everything(monkeypatch, ids, name):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb_trainables(model)
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a flag the user set by hand
    before = snapshot(model, ids)
    fail_on_call(monkeypatch, 3)
    base = model.get_base_model()
    with pytest.raises(RuntimeError, match="injected failure"):
        model.add_adapter(name if name != "default" else "x", LoraConfig(target_modules="all-linear"))
    assert_same(before, snapshot(model, ids))
    fail_on_call(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="injected failure"):  # a second get_peft_model, maybe replacing 'default'
        get_peft_model(base, LoraConfig(target_modules="all-linear"), adapter_name=name)
    assert_same(before, snapshot(model, ids))


def test_a_failed_load_onto_a_model_holding_adapters_changes_nothing(tmp_path, ids):
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    other.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes((tmp_path / "adapter_model.safetensors").read_bytes()[:100])
    model = get_peft_model(tiny_llama(), qv())
    perturb_trainables(model)
    before = snapshot(model, ids)
    for call in (lambda: PeftModel.from_pretrained(model.get_base_model(), str(tmp_path)),
                 lambda: model.load_adapter(str(tmp_path), "more")):
        with pytest.raises(AdapterLoadError):
            call()
        assert_same(before, snapshot(model, ids))
    good = tmp_path / "good"
    LoraConfig(r=4, target_modules=["k_proj"]).save_pretrained(good)
    get_peft_model(tiny_llama(), LoraConfig(r=3, target_modules=["k_proj"])).save_pretrained(good / "wrong")
    (good / "adapter_model.safetensors").write_bytes((good / "wrong" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterLoadError, match="shape mismatch"):  # injected, then the weights do not fit
        PeftModel.from_pretrained(model.get_base_model(), str(good))
    assert_same(before, snapshot(model, ids))


def test_a_stale_adapter_in_the_layers_is_refused_before_anything_changes(ids):
    model = get_peft_model(tiny_llama(), qv())
    base = model.get_base_model()
    del base.__dict__["peft_config"]  # the registry is gone, the layers still hold 'default'
    before = snapshot(model, ids)
    with pytest.raises(ValueError, match="already exists in 4 layers"):
        get_peft_model(base, qv())
    after = snapshot(model, ids)
    assert after["types"] == before["types"] and after["adapters"] == before["adapters"]


# --- prepare_model_for_kbit_training and AutoPeftModel ----------------------------------------------

def test_prepare_model_for_kbit_training_matches_peft_on_a_plain_and_turns_on_checkpointing_on_nf4():
    peft = pytest.importorskip("peft")
    ours, theirs = tiny_llama().half(), tiny_llama().half()
    lorakit.prepare_model_for_kbit_training(ours)
    peft.prepare_model_for_kbit_training(theirs)
    assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.dtype, p.requires_grad) for n, p in theirs.named_parameters()]
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing is False

    from lorakit.quant import quantize_model

    quantized = tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    quantize_model(quantized, skip=["lm_head"])
    lorakit.prepare_model_for_kbit_training(quantized)
    assert quantized.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in quantized.parameters())
    model = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n)


def test_auto_peft_model_loads_the_base_the_adapter_names(tmp_path, ids):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), qv(task_type="CAUSAL_LM"))
    perturb_trainables(model)
    model.save_pretrained(tmp_path / "adapter")
    assert lorakit.PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == str(base_dir)
    loaded = lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", torch_dtype=torch.float32)
    assert isinstance(loaded, lorakit.PeftModelForCausalLM)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    with pytest.raises(AdapterLoadError, match="task_type 'CAUSAL_LM'"):
        lorakit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    from lorakit.hub import ModelLoadError

    with pytest.raises(ModelLoadError, match="lorakit never downloads"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_what_lorakit_does_not_implement_is_named_when_imported_or_configured():
    with pytest.raises(ImportError, match="lorakit does not implement IA3Config"):
        from lorakit import IA3Config  # noqa: F401
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(trainable_token_indices=[1])
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        LoraConfig(rank=8)  # a misspelt field is still an error
    config = LoraConfig(r=4, trainable_token_indices=None, use_qalora=False, revision="main")  # PEFT's defaults pass
    assert config.r == 4 and dataclasses.replace(config, r=2).r == 2
    with pytest.raises(ValueError, match="mixed=True"):
        get_peft_model(tiny_llama(), qv(), mixed=True)


def test_the_key_grammar_parses_and_builds_every_kind_of_key():
    from lorakit import adapter_format as fmt

    assert fmt.file_key("model.layers.0.q_proj.lora_A.default.weight", "default") == \
        "base_model.model.model.layers.0.q_proj.lora_A.weight"
    assert fmt.file_key("model.layers.0.q_proj.lora_A.default.weight", "other") is None
    assert fmt.file_key("embed.lora_embedding_B.my-adapter", "my-adapter") == "base_model.model.embed.lora_embedding_B"
    assert fmt.file_key("l.q.lora_magnitude_vector.default.weight", "default") == "base_model.model.l.q.lora_magnitude_vector"
    assert fmt.file_key("score.modules_to_save.default.weight", "default") == "base_model.model.score.weight"
    assert fmt.file_key("l.q.base_layer.weight", "default") is None
    assert fmt.is_adapter_tensor("l.q.lora_B.x.bias") and not fmt.is_adapter_tensor("l.q.base_layer.bias")
    assert fmt.is_frozen_original("score.original_module.weight")
    assert fmt.adapted_module("a.b.lora_B.default.weight") == "a.b"
    factor = fmt.parse_factor_key("base_model.model.a.b.lora_B.bias")
    assert (factor.module, factor.factor, factor.embedding, factor.leaf) == ("a.b", "B", False, "bias")
    assert fmt.parse_factor_key("base_model.model.e.lora_embedding_A").embedding
    assert fmt.parse_factor_key("base_model.model.a.b.bias") is None
    assert fmt.module_of_file_key("base_model.model.a.b.bias") == "a.b"
    assert fmt.module_of_file_key("base_model.model.a.q.lora_A.weight") == "a.q"


def test_a_failed_load_onto_a_base_running_another_adapter_keeps_it_running(tmp_path, ids):
    get_peft_model(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), qv(), adapter_name="other")  # r=4: the folder's r=3 will not fit... in shape
    perturb_trainables(model)
    before = snapshot(model, ids)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 4  # the config fits the targets, the tensors (r=3) do not: injected, then refused
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        PeftModel.from_pretrained(model.get_base_model(), str(tmp_path))
    assert_same(before, snapshot(model, ids))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_failed_weight_rewriting_injection_or_load_puts_the_base_weights_back(monkeypatch, tmp_path, ids, init):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["k_proj", "o_proj"]), adapter_name="first")
    perturb_trainables(model)
    before = snapshot(model, ids)
    real = ModulesToSave.add_adapter

    def failing(self, name):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ModulesToSave, "add_adapter", failing)  # after every PiSSA/OLoRA layer is initialised
    with pytest.raises(RuntimeError, match="injected failure"):
        model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init,
                                               modules_to_save=["lm_head"]))
    assert_same(before, snapshot(model, ids))
    monkeypatch.setattr(ModulesToSave, "add_adapter", real)

    trained = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    trained.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop(next(iter(tensors)))  # a missing tensor: found only after the init rewrote the base
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="missing"):
        model.load_adapter(str(tmp_path), "broken")
    assert_same(before, snapshot(model, ids))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_weight_rewriting_adapter_never_shares_a_layer_with_another(tmp_path, ids, init):
    """PiSSA/OLoRA replace the base by a residual: another adapter on that layer would silently
    compute something else, so either order is refused before anything changes."""
    model = get_peft_model(tiny_llama(), qv())
    perturb_trainables(model)
    before = snapshot(model, ids)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' replaces this layer's base weight"):
        model.add_adapter("residual", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    assert_same(before, snapshot(model, ids))
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="replaces this layer's base weight"):  # a load, as a server would do it
        model.load_adapter(str(tmp_path), "residual")
    assert_same(before, snapshot(model, ids))
    alone = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    with pytest.raises(ValueError, match=f"adapter 'default' \\(init_lora_weights='{init}'\\)"):
        alone.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    alone.add_adapter("elsewhere", LoraConfig(r=2, target_modules=["v_proj"]))  # another layer: fine
