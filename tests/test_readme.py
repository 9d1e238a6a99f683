"""The README's Python example runs as written and prints what it says; its memory table is the
estimator's; each of its data-form examples is accepted by the data loader."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs(tmp_path):
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    expected = re.search(r"^# (trainable params: .*)$", block, re.MULTILINE).group(1)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_gpu_memory_table_is_what_the_estimator_says():
    from lorakit import memory

    text = README.read_text()
    config = memory.load_model_config("Llama-2-7B")

    def total(mode, world, strategy="fsdp"):
        estimate = memory.estimate(config, r=16, target_modules="all-linear", gradient_checkpointing=True,
                                   batch_size=4, seq_len=2048, world_size=world, strategy=strategy)
        return f"{estimate.breakdowns[mode].total / 2**30:.2f}"

    assert f"| 1 | {total('lora', 1)} GiB | {total('qlora', 1)} GiB |" in text
    for world in (2, 8):
        row = (f"| {world}, fsdp (ddp) | {total('lora', world)} GiB ({total('lora', world, 'ddp')}) | "
               f"{total('qlora', world)} GiB ({total('qlora', world, 'ddp')}) |")
        assert row in text, row


def data_form_blocks() -> list[str]:
    """The bash blocks of the README's "Every data form, one example each" section."""
    text = README.read_text()
    section = text.split("### Every data form, one example each", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.DOTALL)


def test_every_data_form_example_is_accepted_by_the_data_loader(tmp_path):
    import shlex

    from lorakit import cli
    from lorakit.train import data, packing

    from conftest import make_tiny_model_dir

    blocks = data_form_blocks()
    assert len(blocks) == 12  # Alpaca, chat, text, two TRL forms, JSON array, Parquet, CSV, folder, many, mapping, packing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model_dir(tmp_path / "model"))
    work = tmp_path / "work"
    work.mkdir()
    forms = set()
    for block in blocks:
        lines = block.replace("\\\n", " ").splitlines()
        commands = [line for line in lines if line.startswith(".venv/bin/lorakit train")]
        assert len(commands) == 1, block
        setup = "\n".join(line for line in lines if line not in commands).replace(".venv/bin/python", sys.executable)
        result = subprocess.run(["bash", "-euc", setup], cwd=work, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (block, result.stderr[-2000:])
        args = cli.parse("train", shlex.split(commands[0])[2:])
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(work)
            train_rows, val_rows = data.load_data(args["data"], val=args["val_data"], fields=args["data_field"] or None,
                                                   val_fraction=0.0 if args["val_data"] else args["val_fraction"])
            examples = data.tokenize_examples(train_rows, tokenizer, args["max_seq_len"])
            forms |= {path.suffix or "folder" for path in data.resolve_paths(args["data"])}
        assert len(train_rows) >= 1 and len(examples) == len(train_rows), block
        assert all(any(label != data.IGNORE_INDEX for label in e["labels"]) for e in examples), block  # something to learn
        if args["packing"]:
            rows = packing.pack_examples(examples, args["max_seq_len"])
            assert len(rows) < len(examples)
        forms |= {data.example_shape(example) for example in data.iter_examples(train_rows)}
        if args["val_data"]:
            assert len(val_rows) == 1
    assert {"alpaca", "chat", "text", "prompt_completion", "chat_prompt_completion", ".jsonl", ".json", ".parquet",
            ".csv", "folder"} <= forms
