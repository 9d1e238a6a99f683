"""The CLI builds each command's flags from its function's signature and docstring."""

from typing import Literal

import pytest

from lorakit import cli


def example(data: str, r: int = 8, alpha: float = 16.0, targets: list[str] | None = None, fast: bool = False,
            precision: Literal["fp32", "bf16"] = "fp32", out: str | None = None) -> dict:
    """Do an example thing.

    Args:
        data: The data file.
        r: The rank,
            on two lines.
        alpha: Alpha.
        targets: Comma-separated names.
        fast: Go fast.
        precision: Which precision.
        out: Where.
    """
    return locals()


@pytest.fixture
def registered(monkeypatch):
    import sys
    import types

    module = types.ModuleType("lorakit_cli_example")
    module.example = example
    monkeypatch.setitem(sys.modules, "lorakit_cli_example", module)
    monkeypatch.setitem(cli.COMMANDS, "example", "lorakit_cli_example:example")


def test_signature_becomes_flags(registered):
    args = cli.parse("example", ["d.jsonl", "--r", "4", "--targets", "q_proj,v_proj", "--fast", "--precision", "bf16"])
    assert args == dict(data="d.jsonl", r=4, alpha=16.0, targets=["q_proj", "v_proj"], fast=True,
                        precision="bf16", out=None)


def test_help_comes_from_docstring(registered, capsys):
    with pytest.raises(SystemExit):
        cli.parse("example", ["--help"])
    text = capsys.readouterr().out
    assert "Do an example thing." in text and "The rank, on two lines. (default: 8)" in text
    assert "--no-fast" in text and "{fp32,bf16}" in text


def test_yaml_sets_defaults_and_flags_override(registered, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: from_yaml.jsonl\nr: 32\nlora-alpha-typo: 1\n")
    with pytest.raises(SystemExit):
        cli.parse("example", ["--config", str(config)])  # unknown key is an error
    config.write_text("data: from_yaml.jsonl\nr: 32\nalpha: 64\n")
    args = cli.parse("example", ["--config", str(config), "--r", "4"])
    assert (args["data"], args["r"], args["alpha"]) == ("from_yaml.jsonl", 4, 64)


def test_bad_values_exit_2(registered, capsys):
    with pytest.raises(SystemExit) as err:
        cli.parse("example", ["d", "--r", "four"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        cli.parse("example", ["d", "--precision", "fp8"])


def test_unknown_command_and_overview(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out


def test_version_and_suggestions_for_mistypes(capsys):
    import lorakit

    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"
    assert cli.main(["trian"]) == 2 and "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.parse("train", ["--data", "x.jsonl", "--learning-rat", "1e-3"])
    assert exit_info.value.code == 2 and "unrecognized argument '--learning-rat'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse("train", ["--data", "x.jsonl", "--max-step", "3", "--lora-alfa", "8"])
    assert "unrecognized argument '--lora-alfa'; did you mean --lora-alpha?" in capsys.readouterr().err


def test_mapping_flags_repeat_and_merge(tmp_path, capsys):
    args = cli.parse("train", ["--data", "x.jsonl", "--data-field", "instruction=question",
                               "--data-field", "output=answer,input=context"])
    assert args["data_field"] == {"instruction": "question", "output": "answer", "input": "context"}
    args = cli.parse("train", ["--data", "x.jsonl", "--rank-pattern", "q_proj=16", "--rank-pattern", "v_proj=4"])
    assert args["rank_pattern"] == {"q_proj": 16, "v_proj": 4}
    config = tmp_path / "run.yaml"
    config.write_text("data: x.jsonl\ndata_field: {text: body}\n")
    assert cli.parse("train", ["--config", str(config)])["data_field"] == {"text": "body"}
    # the command line replaces the file's mapping (it does not merge into it)
    args = cli.parse("train", ["--config", str(config), "--data-field", "instruction=q", "--data-field", "output=a"])
    assert args["data_field"] == {"instruction": "q", "output": "a"}
    with pytest.raises(SystemExit) as exit_info:
        cli.parse("train", ["--data", "x.jsonl", "--data-field", "output=a", "--data-field", "output=b"])
    assert exit_info.value.code == 2
    assert "'output' is given twice" in capsys.readouterr().err
