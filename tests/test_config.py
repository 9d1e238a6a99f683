import pytest

from lorakit import ConfigError, LoraConfig


def test_defaults_are_peft_defaults():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert c.peft_type == "LORA"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=0), "r must be an integer >= 1"),
    (dict(r=2.5), "r must be an integer >= 1"),
    (dict(lora_alpha=0), "lora_alpha must be a finite number in (0"),
    (dict(lora_alpha=-1), "lora_alpha must be a finite number in (0"),
    (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1)"),
    (dict(lora_dropout=-0.1), "lora_dropout must be in [0, 1)"),
    (dict(bias="some"), "bias must be one of"),
    (dict(init_lora_weights="xavier"), "init_lora_weights must be one of"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']"),
    (dict(alpha_pattern={"q_proj": -2}), "alpha_pattern['q_proj']"),
    (dict(target_modules=[1, 2]), "target_modules must be a list"),
    (dict(target_modules=".*proj", layers_to_transform=[0]), "layers_to_transform cannot be combined"),
    (dict(layers_to_transform=[-1]), "layers_to_transform must be"),
    (dict(task_type="CAUSAL"), "task_type must be one of"),
    (dict(use_dora=True, lora_bias=True), "not supported with use_dora=True"),
    (dict(use_dora=1), "use_dora must be true or false"),
])
def test_bad_values_are_named(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kwargs)
    assert fragment in str(err.value)


def test_dict_round_trip():
    c = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                   modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    assert LoraConfig.from_dict(c.to_dict()) == c


def test_from_dict_tolerates_unknown_and_refuses_other_types():
    data = LoraConfig().to_dict() | {"peft_version": "0.21.2", "some_future_field": 3, "layer_replication": None}
    with pytest.warns(UserWarning, match="some_future_field"):
        LoraConfig.from_dict(data)
    with pytest.raises(ConfigError, match="peft_type 'IA3'"):
        LoraConfig.from_dict(data | {"peft_type": "IA3"})
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        LoraConfig.from_dict({"r": 8})
    with pytest.raises(ConfigError, match="layer_replication"):
        LoraConfig.from_dict(LoraConfig().to_dict() | {"layer_replication": [[0, 2]]})


def test_patterns_first_match_at_end_of_path():
    c = LoraConfig(r=8, lora_alpha=16, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4},
                   alpha_pattern={"v_proj": 3})
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.1.self_attn.q_proj") == 4
    assert c.rank_for("model.layers.1.self_attn.xq_proj") == 8  # suffix must start at a dot
    assert c.alpha_for("model.layers.1.self_attn.v_proj") == 3
    assert c.alpha_for("model.layers.1.self_attn.q_proj") == 16


@pytest.mark.parametrize("field, value, match", [
    ("lora_alpha", float("inf"), "lora_alpha must be a finite number"),
    ("lora_alpha", 1e308, "lora_alpha must be a finite number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("use_rslora", "no", "use_rslora must be true or false"),
    ("fan_in_fan_out", 1, "fan_in_fan_out must be true or false"),
    ("inference_mode", "yes", "inference_mode must be true or false"),
    ("target_modules", "q_proj(", "target_modules 'q_proj\\(' is not a valid regular expression"),
    ("rank_pattern", {"[a-": 4}, "rank_pattern key '\\[a-' is not a valid regular expression"),
    ("alpha_pattern", {"(x": 4.0}, "alpha_pattern key"),
])
def test_nonsense_values_are_refused_by_name(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{field: value})
    with pytest.raises(ConfigError, match=match):
        LoraConfig.from_dict({**LoraConfig().to_dict(), field: value})


def test_a_deeply_nested_or_non_float_adapter_is_refused_by_name(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lorakit import AdapterLoadError
    from lorakit.adapter_format import read_adapter

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "rank_pattern": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(AdapterLoadError, match="nested too deeply"):
        read_adapter(tmp_path)
    LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2, dtype=dtype)}, tmp_path / "adapter_model.safetensors")
        with pytest.raises(AdapterLoadError, match=f"must be floating point.*{str(dtype).removeprefix('torch.')}"):
            read_adapter(tmp_path)


def test_fan_in_fan_out_is_corrected_per_layer_type_as_peft_does():
    from conftest import tiny_gpt2, tiny_llama

    from lorakit import get_peft_model

    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.fan_in_fan_out is False
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
    assert gpt2.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out is True
