import pytest

from lorakit import LoraConfig, TargetError
from lorakit.targeting import layer_index, resolve_target_modules, select_modules_to_save, select_targets

from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama


def test_list_matches_exact_name_or_dotted_suffix():
    paths = select_targets(tiny_llama(), LoraConfig(target_modules=["q_proj", "mlp.up_proj"]))
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]


def test_regex_must_match_whole_path():
    assert select_targets(tiny_llama(), LoraConfig(target_modules=r".*\.1\.self_attn\.(k|v)_proj")) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(TargetError):
        select_targets(tiny_llama(), LoraConfig(target_modules="q_proj"))  # not a full match of any path


def test_all_linear_skips_output_head():
    targets = resolve_target_modules(tiny_llama(), LoraConfig(target_modules="all-linear"))
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    gpt2 = resolve_target_modules(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in gpt2 and "c_attn" in gpt2


def test_defaults_per_architecture():
    assert resolve_target_modules(tiny_llama(), LoraConfig()) == ["q_proj", "v_proj"]
    assert resolve_target_modules(tiny_gpt2(), LoraConfig()) == ["c_attn"]
    assert resolve_target_modules(tiny_bert_classifier(), LoraConfig()) == ["query", "value"]


def test_exclude_and_layers_to_transform():
    model = tiny_llama()
    paths = select_targets(model, LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]))
    assert all(p.endswith("q_proj") for p in paths) and len(paths) == 2
    paths = select_targets(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"))
    assert paths == ["model.layers.1.self_attn.q_proj"]
    assert layer_index("model.layers.3.mlp.up_proj", None) == 3
    assert layer_index("transformer.h.5.attn.c_attn", "h") == 5


def test_no_match_names_types_and_existing_names():
    with pytest.raises(TargetError) as err:
        select_targets(tiny_llama(), LoraConfig(target_modules=["query"]))
    msg = str(err.value)
    assert "['query']" in msg and "Linear" in msg and "q_proj" in msg


def test_modules_to_save_never_adapted_and_seq_cls_head_added():
    model = tiny_bert_classifier()
    config = LoraConfig(target_modules=["query", "dense"], task_type="SEQ_CLS")
    assert select_modules_to_save(model, config) == ["classifier"]
    config = LoraConfig(target_modules=["query", "dense"], modules_to_save=["pooler"])
    assert not any(p.startswith("bert.pooler") for p in select_targets(model, config))
    with pytest.raises(TargetError, match="no module named 'head'"):
        select_modules_to_save(model, LoraConfig(modules_to_save=["head"]))
