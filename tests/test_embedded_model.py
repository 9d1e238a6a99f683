"""The embedded SmolLM2-135M-Instruct end to end: a few training steps on the shipped task, the
adapter reloaded from disk, and the CLI's generate on it (slow: converts the GGUF once)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lorakit import PeftModel, prompts
from lorakit.hub import load_model_and_tokenizer
from lorakit.train import data, tasks
from lorakit.train.loop import train

pytestmark = pytest.mark.slow


def test_train_a_few_steps_and_reload(tmp_path):
    train_path, eval_path = tasks.write_splits(tmp_path / "data", 64, 4, seed=0)
    summary = train(data=str(train_path), out=str(tmp_path / "run"), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    lora_dropout=0.0, max_steps=3, batch_size=4, lr=2e-3, max_seq_len=160, val_fraction=0.1, quiet=True)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    base, tokenizer = load_model_and_tokenizer()
    model = PeftModel.from_pretrained(base, summary["adapter"])
    assert len(list(model.base_model.lora_layers())) == 2 * 30
    example = data.read_jsonl(eval_path)[0]
    ids = torch.tensor([prompts.encode_prompt(example, tokenizer)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_cli_generate_streams_an_answer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "generate", "What is the capital of France?",
                             "--max-new-tokens", "12"], capture_output=True, text=True, timeout=600,
                            env=os.environ | {"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path, capsys):
    from lorakit.demo import demo

    results = demo(out=str(tmp_path / "demo"), n_train=32, n_eval=4, steps=2, batch_size=4, max_new_tokens=12,
                   eval_batch_size=4, show=1)
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert saved == results and saved["held_out"] == 4 and saved["train_steps"] == 2
    assert 0.0 <= saved["exact_match_before"] <= 1.0 and 0.0 <= saved["exact_match_after"] <= 1.0
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "before fine-tuning: exact match" in out and "expected :" in out and "->  after" in out
