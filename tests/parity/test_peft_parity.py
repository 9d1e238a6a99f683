"""Adapters move between lorakit and PEFT 0.21.2 (the oracle) with the same outputs.

Each case builds the same random adapter in one library, saves it, loads it into a fresh base
in the other and compares logits (max abs diff <= 1e-5, fp32).
"""

import pytest
import torch

import lorakit

peft = pytest.importorskip("peft")

from conftest import assert_round_trip, tiny_bert_classifier, tiny_gpt2, tiny_llama  # noqa: E402

CASES = {
    "llama-qv": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-dropout": (tiny_llama, dict(target_modules="all-linear", lora_dropout=0.05)),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"])),
    "gpt2-bias-all": (tiny_gpt2, dict(target_modules=["c_attn"], bias="all")),
    "bert-modules-to-save": (tiny_bert_classifier, dict(target_modules=["query", "value"],
                                                        modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "llama-rank-alpha-pattern": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                                  rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6},
                                                  alpha_pattern={"v_proj": 3})),
    "llama-rslora": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], use_rslora=True)),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "llama-regex-layers": (tiny_llama, dict(target_modules=r".*\.1\.mlp\.(up|gate)_proj")),
    "llama-layers-to-transform": (tiny_llama, dict(target_modules=["k_proj"], layers_to_transform=[1],
                                                   layers_pattern="layers")),
}


@pytest.mark.parametrize("adapter_name", ["default", "other"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_to_peft_and_back(case, adapter_name, tmp_path, ids):
    make, kwargs = CASES[case]
    ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs), adapter_name=adapter_name)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, **kwargs), adapter_name=adapter_name)
    assert_round_trip(ours, theirs, make, ids, tmp_path, adapter_name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_trainable_parameter_names_and_counts(case):
    make, kwargs = CASES[case]
    ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
    names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert names(ours) == names(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


META_ARCHITECTURES = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


@pytest.mark.parametrize("arch", sorted(META_ARCHITECTURES))
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_meta_device_count_line_equals_peft(arch, targets, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(META_ARCHITECTURES[arch])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    lines = []
    for lib in (lorakit, peft):
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config)
        lib.get_peft_model(base, lib.LoraConfig(r=16, target_modules=targets)).print_trainable_parameters()
        lines.append(capsys.readouterr().out.strip())
    assert lines[0] == lines[1]
    assert lines[0].startswith("trainable params: ")
