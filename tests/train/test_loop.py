"""The trainer on a tiny real model folder: loss falls, files, checkpoints, resume, torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit import PeftModel
from lorakit.train.loop import global_batches, lr_lambda, train

from conftest import make_tiny_model_dir, train_tiny, write_copy_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_tiny_model_dir(root / "model"), write_copy_task(root / "data.jsonl", n=96)


def run(setup, out, **kw):
    return train_tiny(*setup, out, **(dict(max_steps=12, val_fraction=0.1, quiet=True) | kw))


def adapter_tensors(out):
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def test_loss_falls_and_files_are_written(setup, tmp_path):
    summary = run(setup, tmp_path, max_steps=30, eval_every=10, log_every=1)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 31))
    assert {"loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "grad_norm"} <= steps[0].keys()
    assert [x["step"] for x in evals] == [10, 20, 30]
    first, last = sum(x["loss"] for x in steps[:3]) / 3, sum(x["loss"] for x in steps[-3:]) / 3
    assert last < 0.85 * first
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    config = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert config["r"] == 4 and config["total_steps"] == 30 and config["world_size"] == 1
    assert summary["val_loss"] == evals[-1]["val_loss"]
    model, _ = setup
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(tmp_path / "adapter"))
    assert len(list(loaded.base_model.lora_layers())) == 2 * 7


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup_steps=4, total_steps=12)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)


def test_loraplus_gives_b_a_larger_learning_rate():
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train.loop import param_groups

    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    plain = param_groups(model, 1e-3)
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3
    groups = param_groups(model, 1e-3, loraplus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[1]["lr"] == pytest.approx(16e-3)
    assert all(".lora_B." in names[id(p)] or "lora_embedding_B" in names[id(p)] for p in groups[1]["params"])
    assert all(".lora_A." in names[id(p)] or "lora_embedding_A" in names[id(p)] for p in groups[0]["params"])


def test_global_batches_cover_each_epoch_once():
    batches = list(global_batches(10, 5, seed=3, start_step=0, total_steps=4))
    assert sorted(batches[0] + batches[1]) == list(range(10))
    assert batches[2] != batches[0]  # a new shuffle per epoch
    assert list(global_batches(10, 5, seed=3, start_step=3, total_steps=4)) == batches[3:]


def test_gradient_checkpointing_and_bf16_run(setup, tmp_path):
    summary = run(setup, tmp_path, max_steps=3, gradient_checkpointing=True, precision="bf16", lora_dropout=0.1)
    assert summary["steps"] == 3 and all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path).values())


def test_qlora_training_lowers_the_loss_and_saves_an_ordinary_adapter(setup, tmp_path):
    run(setup, tmp_path, max_steps=20, quantize="nf4", double_quant=True, gradient_checkpointing=True)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    model, _ = setup
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(tmp_path / "adapter"))  # float base


def test_checkpoint_resume_equals_uninterrupted(setup, tmp_path):
    reference = run(setup, tmp_path / "ref", max_steps=40, lora_dropout=0.1)
    assert reference["steps"] == 40
    model, data = setup
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lorakit.cli", "train", "--data", str(data), "--model", str(model), "--out", str(out),
           "--r", "4", "--lora-alpha", "8", "--target-modules", "all-linear", "--lora-dropout", "0.1",
           "--batch-size", "4", "--lr", "0.03", "--max-steps", "40", "--val-fraction", "0.1", "--save-every", "5",
           "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000010" / "trainer_state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()  # killed before the end
    resumed = run(setup, out, max_steps=40, lora_dropout=0.1, save_every=5, resume=True)
    assert resumed["steps"] == 40
    ref, got = adapter_tensors(tmp_path / "ref"), adapter_tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 41))  # each step once, though steps after the checkpoint ran twice


def test_torchrun_two_processes_match_one(setup, tmp_path):
    one = run(setup, tmp_path / "one", batch_size=4, max_steps=6)
    model, data = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit.cli",
           "--", "train", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "two"), "--r", "4",
           "--lora-alpha", "8", "--target-modules", "all-linear", "--lora-dropout", "0", "--batch-size", "2",
           "--lr", "0.03", "--max-steps", "6", "--val-fraction", "0.1", "--quiet", "--report-to", "tensorboard"]
    result = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    config = yaml.safe_load((tmp_path / "two" / "run_config.yaml").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 4
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert one["steps"] == 6


def test_cli_names_the_malformed_line(setup, tmp_path):
    model, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "copy : a", "output": "a"}\n{"instruction": "copy : b", "output": 3}\n')
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--data", str(bad), "--model", str(model),
                             "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "bad.jsonl" in result.stderr and "line 2" in result.stderr and "output" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_lora_setting_is_a_flag_and_a_yaml_key(setup, tmp_path):
    from lorakit import cli

    model, data = setup
    common = ["--data", str(data), "--model", str(model), "--max-steps", "3", "--batch-size", "4",
              "--target-modules", "q_proj,v_proj", "--val-fraction", "0", "--quiet"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "flags"), "--use-dora", "--init-lora-weights",
                     "gaussian", "--rank-pattern", "v_proj=2", "--alpha-pattern", "v_proj=4",
                     "--layers-to-transform", "0", "--bias", "lora_only"]) == 0
    saved = json.loads((tmp_path / "flags" / "adapter" / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["init_lora_weights"], saved["rank_pattern"], saved["alpha_pattern"],
            saved["layers_to_transform"], saved["bias"]) == (True, "gaussian", {"v_proj": 2}, {"v_proj": 4.0}, [0],
                                                             "lora_only")
    tensors = load_file(tmp_path / "flags" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in tensors
    assert not any(".layers.1." in k for k in tensors)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 2
    run_config = yaml.safe_load((tmp_path / "flags" / "run_config.yaml").read_text())
    assert run_config["use_dora"] is True and run_config["rank_pattern"] == {"v_proj": 2}

    config = tmp_path / "run.yaml"
    config.write_text("lora_bias: true\ninit_lora_weights: false\nmodules_to_save: [lm_head]\n")
    assert cli.main(["train", *common, "--out", str(tmp_path / "yaml"), "--config", str(config)]) == 0
    saved = json.loads((tmp_path / "yaml" / "adapter" / "adapter_config.json").read_text())
    assert (saved["lora_bias"], saved["init_lora_weights"], saved["modules_to_save"]) == (True, False, ["lm_head"])
    assert cli.main(["train", *common, "--out", str(tmp_path / "bad"), "--use-dora", "--lora-bias"]) == 2  # refused


def test_records_and_flat_flags_train_the_same_adapter(setup, tmp_path):
    from lorakit.train.recipe import DataSettings, ModelSettings, OptimSettings, RunSettings, lora_config

    model, data = setup
    run(setup, tmp_path / "flat", max_steps=3)
    train(model=ModelSettings(model=str(model)),
          lora=lora_config(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
          data=DataSettings(data=str(data), val_fraction=0.1), optim=OptimSettings(batch_size=4, lr=3e-2, max_steps=3),
          run=RunSettings(out=str(tmp_path / "records"), quiet=True))
    flat, records = adapter_tensors(tmp_path / "flat"), adapter_tensors(tmp_path / "records")
    assert flat.keys() == records.keys() and all(torch.equal(flat[k], records[k]) for k in flat)


def test_packed_training_learns_and_counts_real_tokens(setup, tmp_path):
    summary = run(setup, tmp_path, max_steps=20, packing=True, max_seq_len=64, batch_size=2)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(x["loss"] for x in lines[-3:]) < 0.85 * sum(x["loss"] for x in lines[:3])
    assert summary["val_loss"] is not None
    assert lines[0]["tokens"] > 2 * 8  # two packed rows of several examples each, not two examples


def test_other_data_forms_and_column_names_reach_the_trainer(setup, tmp_path):
    import datasets

    model, data = setup
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    renamed = datasets.Dataset.from_list([{"question": r["instruction"], "answer": r["output"]} for r in rows])
    renamed.to_parquet(str(tmp_path / "part.parquet"))
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--data", str(tmp_path / "*.parquet"),
                             "--data-field", "instruction=question,output=answer", "--model", str(model),
                             "--out", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    assert config["train_examples"] + config["val_examples"] == len(rows)
