"""The training records (train/recipe.py): flat names route to their record, the CLI's flags and a
YAML file (flat or in sections) are those records, and bad settings fail before any model loads."""

import dataclasses
import math

import pytest

from lorakit import ConfigError, LoraConfig, cli
from lorakit.train.loop import train
from lorakit.train.recipe import (LORA_FIXED, SECTIONS, DataSettings, ModelSettings, OptimSettings, Recipe,
                                  RunSettings, lora_config)


def test_flat_names_go_to_their_record_and_defaults_fill_the_rest():
    recipe = Recipe.from_flags(data="x.jsonl", r=16, lr=1e-3, quantize="nf4", out="runs/x", use_dora=True,
                               target_modules=["all-linear"])
    assert recipe.data == DataSettings(data="x.jsonl")
    assert recipe.model == ModelSettings(quantize="nf4")
    assert recipe.optim == OptimSettings(lr=1e-3)
    assert recipe.run == RunSettings(out="runs/x")
    assert (recipe.lora.r, recipe.lora.lora_alpha, recipe.lora.lora_dropout, recipe.lora.use_dora) == (16, 32, 0.05, True)
    assert recipe.lora.target_modules == "all-linear" and recipe.lora.task_type == "CAUSAL_LM"
    assert Recipe.from_flags(**recipe.to_flags()) == recipe  # the flat form is the whole recipe
    assert recipe.replace(lr=5e-4).optim.lr == 5e-4 and recipe.replace(lr=5e-4).lora == recipe.lora


def test_every_field_name_is_unique_across_records():
    names = [name for section in SECTIONS for name in section.field_names()]
    assert len(names) == len(set(names))


def test_unknown_names_and_bad_lora_values_are_refused():
    with pytest.raises(TypeError, match=r"unknown training settings \['learning_rate'\]"):
        Recipe.from_flags(learning_rate=1e-3)
    with pytest.raises(ConfigError, match="lora_alpha"):
        lora_config(lora_alpha=math.inf)


def test_bad_settings_fail_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-such-model")  # loading it would fail with a different error
    with pytest.raises(ConfigError, match="lora_alpha"):
        train(data="x.jsonl", model=missing, lora_alpha=math.inf, out=str(tmp_path / "run"))
    with pytest.raises(TypeError, match="unknown training settings"):
        train(data="x.jsonl", model=missing, learning_rate=1e-3)
    assert not (tmp_path / "run").exists()


def test_every_lora_config_field_is_a_train_flag():
    dests = {action.dest for action in cli.command_parser("train")._actions}
    fields = {f.name for f in dataclasses.fields(LoraConfig)} - set(LORA_FIXED)
    assert fields <= dests
    for section in SECTIONS:
        assert set(section.field_names()) <= dests


def test_a_yaml_file_is_the_records_flat_or_in_sections(tmp_path):
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text("model: {model: ./base, quantize: nf4}\nlora: {r: 16, use_dora: true, rank_pattern: {q_proj: 4}}\n"
                         "data: {data: train.jsonl}\noptim: {lr: 0.001}\nrun: {out: runs/y}\n")
    args = cli.parse("train", ["--config", str(sectioned), "--lr", "0.002"])
    assert (args["model"], args["quantize"], args["r"], args["use_dora"]) == ("./base", "nf4", 16, True)
    assert args["rank_pattern"] == {"q_proj": 4} and args["data"] == ["train.jsonl"] and args["out"] == "runs/y"
    assert args["lr"] == 0.002  # the command line over the file
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: ./base\ndata: train.jsonl\nr: 16\n")
    assert cli.parse("train", ["--config", str(flat)])["model"] == "./base"
    recipe = Recipe.from_flags(**cli.parse("train", ["--config", str(sectioned)]))
    assert recipe.lora.use_dora and recipe.model.quantize == "nf4"


def test_a_name_set_twice_in_a_yaml_file_is_an_error(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("r: 8\nlora: {r: 16}\ndata: x.jsonl\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse("train", ["--config", str(twice)])
    assert exit_info.value.code == 2 and "'r' is set twice" in capsys.readouterr().err


def test_train_requires_data_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        cli.parse("train", ["--r", "4"])
    assert "--data" in capsys.readouterr().err


def test_the_readme_import_works():
    import lorakit.train

    assert lorakit.train.train is train and lorakit.train.lora_config is lora_config


def test_flags_over_a_given_lora_config_keep_its_other_fields():
    from lorakit.train.loop import resolve_recipe

    given = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS", lora_dropout=0.0)
    recipe = resolve_recipe(None, given, "x.jsonl", None, None, {"lr": 1e-3, "r": 8})
    assert recipe.lora.fan_in_fan_out and recipe.lora.task_type == "SEQ_CLS" and recipe.lora.lora_dropout == 0.0
    assert recipe.lora.r == 8 and recipe.optim.lr == 1e-3 and recipe.data.data == "x.jsonl"
    assert given.r == 4  # the caller's record is not changed
    with pytest.raises(TypeError, match="unknown training settings"):
        recipe.replace(learning_rate=1.0)
