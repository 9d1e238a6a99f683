"""The README's Python example runs as written and prints what the README says it prints."""

import re
import subprocess
import sys
from pathlib import Path

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
