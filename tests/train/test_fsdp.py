"""FSDP2 training (train/distributed.py) in real `torchrun --nproc_per_node=2` runs on CPU (gloo):
the same adapter as one process with the same global batch, for LoRA and QLoRA, each rank holding
about half the base, and a resumed run equal to an uninterrupted one."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.train.loop import train

from conftest import make_tiny_model_dir, write_copy_task

COMMON = dict(r=4, lora_alpha=8, target_modules=["all-linear"], lora_dropout=0.0, lr=3e-2, max_steps=6,
              warmup_steps=2, val_fraction=0.1, quiet=True, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return make_tiny_model_dir(root / "model"), write_copy_task(root / "data.jsonl", n=96)


def flags(settings: dict) -> list[str]:
    out = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        else:
            out += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return out


def torchrun(setup, out, **settings):
    model, data = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit.cli",
           "--", "train", "--data", str(data), "--model", str(model), "--out", str(out), "--strategy", "fsdp",
           *flags(COMMON | settings)]
    result = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load((out / "run_config.yaml").read_text())


def one_process(setup, out, **settings):
    model, data = setup
    train(data=str(data), model=str(model), out=str(out), **(COMMON | settings))  # (settings may set device)
    return yaml.safe_load((out / "run_config.yaml").read_text())


def assert_same_adapter(a_dir, b_dir, tol=1e-4):
    a, b = load_file(a_dir / "adapter" / "adapter_model.safetensors"), load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=key)


def assert_half_each(one_config, fsdp_config, floor_bytes=0):
    whole, shares = one_config["base_bytes_per_rank"][0], fsdp_config["base_bytes_per_rank"]
    assert len(shares) == 2
    for share in shares:  # half, give or take padding and the replicated buffers
        assert abs(share - whole / 2) <= 0.1 * whole, (shares, whole)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_fsdp_matches_one_process_and_halves_the_base(setup, tmp_path, quantize):
    # one process: 4 examples a step; FSDP: 2 ranks x 1 example x 2 accumulated micro-batches
    one = one_process(setup, tmp_path / "one", batch_size=4, quantize=quantize)
    two = torchrun(setup, tmp_path / "two", batch_size=1, grad_accum=2, quantize=quantize)
    assert two["world_size"] == 2 and two["global_batch"] == 4 and two["strategy"] == "fsdp"
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    assert_half_each(one, two)
    assert_estimate_matches(setup, two, quantize)


def assert_estimate_matches(setup, fsdp_config, quantize):
    """`lorakit memory --world-size 2 --strategy fsdp`'s base per rank is what each rank held."""
    from lorakit import memory

    model, _ = setup
    estimate = memory.estimate(memory.load_model_config(str(model)), r=COMMON["r"], target_modules="all-linear",
                               dtype="fp32", double_quant=False, world_size=2, strategy="fsdp")
    predicted = estimate.breakdowns["qlora" if quantize == "nf4" else "lora"].base
    for share in fsdp_config["base_bytes_per_rank"]:  # (the measure also counts the replicated buffers)
        assert abs(share - predicted) <= 0.05 * predicted, (fsdp_config["base_bytes_per_rank"], predicted)


@pytest.mark.slow
def test_fsdp_resume_equals_an_uninterrupted_run(setup, tmp_path):
    torchrun(setup, tmp_path / "whole", batch_size=2, save_every=3)
    step3 = tmp_path / "whole" / "checkpoints" / "step-0000003"
    assert (step3 / "trainer_state.pt").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(step3, resumed / "checkpoints" / "step-0000003")
    torchrun(setup, resumed, batch_size=2, save_every=3, resume=True)
    assert_same_adapter(tmp_path / "whole", resumed, tol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_device_is_one_line_and_exit_status_2(setup, tmp_path):
    model, data = setup
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--data", str(data), "--model", str(model),
                             "--out", str(tmp_path / "out"), "--device", "cuda"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device cuda: this machine has no CUDA device (available: cpu" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_runs_in_bf16_with_fp32_adapters(setup, tmp_path):
    config = one_process(setup, tmp_path / "cuda", batch_size=4, device="cuda", precision="bf16")
    assert config["device"].startswith("cuda")
    tensors = load_file(tmp_path / "cuda" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
