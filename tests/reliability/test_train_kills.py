"""`lorakit train` killed with SIGKILL at random instants, resumed each time (a real subprocess
checkpointing every step): every `step-*` folder present after a kill is complete and loads,
what a kill left half-written is gone once the next run has started, and the last run's
adapter equals an uninterrupted run's. Plus the checkpoint functions on their own.

    pytest tests/reliability/test_train_kills.py -m slow -s     # 25 kills; prints the figures
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.files import is_temporary
from lorakit.train.distributed import Dist
from lorakit.train.loop import (CHECKPOINT_FILES, CHECKPOINTS, STATE_NAME, checkpoints, latest_checkpoint,
                                remove_run_leftovers, save_checkpoint, train)

from conftest import make_tiny_model_dir, tiny_llama, write_copy_task

SETTINGS = dict(r=4, lora_alpha=8, target_modules=["all-linear"], lora_dropout=0.1, batch_size=4, lr=3e-2,
                val_fraction=0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    return make_tiny_model_dir(root / "model"), write_copy_task(root / "data.jsonl", n=96)


def command(setup, out: Path, max_steps: int, resume: bool) -> list[str]:
    model, data = setup
    cmd = [sys.executable, "-m", "lorakit.cli", "train", "--data", str(data), "--model", str(model), "--out", str(out),
           "--max-steps", str(max_steps), "--save-every", "1", "--quiet"]
    for name, value in SETTINGS.items():
        cmd += ["--" + name.replace("_", "-"), ",".join(value) if isinstance(value, list) else str(value)]
    return cmd + (["--resume"] if resume else [])


def temporaries(out: Path) -> set[str]:
    """What a writer left half-done under `out` (every place the trainer writes)."""
    found = set()
    for folder in (out, out / CHECKPOINTS, out / "adapter"):
        if folder.is_dir():
            found |= {str(p.relative_to(out)) for p in folder.iterdir()
                      if is_temporary(p.name) or p.name.startswith(".tmp-step-")}
    return found


def assert_checkpoints_complete(out: Path, model_dir: Path) -> int:
    """Every `step-*` folder holds a whole checkpoint that loads; returns how many there are."""
    folders = sorted((out / CHECKPOINTS).glob("step-*"))
    assert folders == checkpoints(out), "a step-* folder is incomplete"
    for folder in folders:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(folder))  # strict load
        assert torch.load(folder / STATE_NAME, weights_only=False)["step"] == int(folder.name.removeprefix("step-"))
    return len(folders)


def latest_step(out: Path) -> int:
    latest = latest_checkpoint(out)
    return int(latest.name.removeprefix("step-")) if latest is not None else 0


def kill_and_resume(setup, tmp_path, kills: int, seed: int) -> dict:
    """Run `lorakit train`, kill it `kills` times at random instants (each after it has written a
    new checkpoint, plus up to 0.15 s), resume it each time, then let a last run finish."""
    model_dir, _ = setup
    max_steps = 10 * kills  # more steps than the kills can reach: every kill lands mid-run
    rng = random.Random(seed)
    out = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    figures = {"kills": 0, "resumes": 0, "kills_leaving_temporaries": 0, "checkpoints_checked": 0}
    for i in range(kills):
        left = temporaries(out)
        before = latest_step(out)
        proc = subprocess.Popen(command(setup, out, max_steps, resume=i > 0), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        figures["resumes"] += i > 0
        deadline = time.monotonic() + 120
        while latest_step(out) <= before:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no new checkpoint in 120 s"
            time.sleep(0.005)
        # the new run has started and gone on: what the last kill left half-written is gone
        assert not left & temporaries(out), f"kill {i}: left over after the next start: {left & temporaries(out)}"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, "the run ended before its kill"
        figures["kills"] += 1
        figures["kills_leaving_temporaries"] += bool(temporaries(out))
        figures["checkpoints_checked"] += assert_checkpoints_complete(out, model_dir)
    left = temporaries(out)
    model, data = setup
    train(data=str(data), model=str(model), out=str(out), max_steps=max_steps, save_every=1, resume=True, quiet=True,
          **SETTINGS)
    figures["resumes"] += 1
    assert not temporaries(out), f"left after the last run: {temporaries(out)} (before it: {left})"
    assert_checkpoints_complete(out, model_dir)
    reference = tmp_path / "reference"
    train(data=str(data), model=str(model), out=str(reference), max_steps=max_steps, quiet=True, **SETTINGS)
    ref = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert ref.keys() == got.keys() and ref
    for key in ref:  # the resume test's tolerance (test_loop.test_checkpoint_resume_equals_uninterrupted)
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    figures["bit_identical"] = all(torch.equal(got[k], ref[k]) for k in ref)
    figures["max_abs_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, max_steps + 1))  # each step once, though some ran several times
    figures["steps"] = max_steps
    return figures


@pytest.mark.slow
def test_25_kills_at_random_instants_resume_to_the_uninterrupted_adapter(setup, tmp_path):
    figures = kill_and_resume(setup, tmp_path, kills=25, seed=0)
    print(f"\nlorakit train kill -9 loop: {json.dumps(figures)}")
    assert figures["kills"] == 25 and figures["resumes"] == 25
    assert figures["kills_leaving_temporaries"] >= 1  # some kills landed mid-write, so the cleanup was exercised


def test_a_few_kills_resume_to_the_uninterrupted_adapter(setup, tmp_path):
    # (too few kills to be sure one lands mid-write: the cleanup itself is checked deterministically by
    # test_the_next_run_removes_what_killed_writers_left_and_nothing_else)
    figures = kill_and_resume(setup, tmp_path, kills=2, seed=1)
    assert figures["kills"] == 2 and figures["resumes"] == 2


# --- the checkpoint functions on their own ------------------------------------------------------------

def checkpointing(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return lambda step, **kw: save_checkpoint(tmp_path, step, model, optimizer, scheduler, Dist(), **kw)


def test_checkpoints_are_whole_and_old_ones_are_removed_through_a_temporary_name(tmp_path, monkeypatch):
    save = checkpointing(tmp_path)
    for step in (1, 2, 3):
        save(step)
    root = tmp_path / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000003"]
    assert all(sorted(p.name for p in f.iterdir()) == sorted(CHECKPOINT_FILES + ("README.md",))
               for f in root.iterdir())
    save(3)  # the same step again (a run started over without --resume): swapped whole
    assert latest_checkpoint(tmp_path) == root / "step-0000003"

    import lorakit.files as files

    rmtree = files.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):  # a kill in the middle of deleting the oldest checkpoint
        if not is_temporary(Path(path).name) or ".trash-" not in Path(path).name:
            return rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / STATE_NAME).unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save(4)
    monkeypatch.undo()
    names = sorted(p.name for p in root.iterdir())
    assert names[-2:] == ["step-0000003", "step-0000004"] and len(names) == 3  # step 2 renamed aside, half-deleted
    assert is_temporary(names[0], of="step-0000002")
    assert remove_run_leftovers(tmp_path) == [f"{CHECKPOINTS}/{names[0]}"]
    assert checkpoints(tmp_path) == [root / "step-0000003", root / "step-0000004"]


def test_latest_checkpoint_picks_only_a_complete_one(tmp_path):
    save = checkpointing(tmp_path)
    save(5)
    root = tmp_path / CHECKPOINTS
    for name, files in [("step-0000009", [STATE_NAME]),                                # no adapter
                        ("step-0000008", [STATE_NAME, "adapter_model.safetensors"]),   # no config
                        ("step-latest", list(CHECKPOINT_FILES))]:                      # not a step number
        (root / name).mkdir()
        for file in files:
            (root / name / file).write_bytes(b"x")
    (root / "step-0000007").write_bytes(b"a file, not a folder")
    assert latest_checkpoint(tmp_path) == root / "step-0000005"
    assert checkpoints(tmp_path) == [root / "step-0000005"]
    save(6)  # pruning removes the incomplete ones too, keeping the two newest complete ones
    assert sorted(p.name for p in root.iterdir()) == ["step-0000005", "step-0000006"]
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_the_next_run_removes_what_killed_writers_left_and_nothing_else(tmp_path):
    root = tmp_path / CHECKPOINTS
    (root / "step-0000004").mkdir(parents=True)
    leftovers = {
        ".run_config.yaml.tmp-41-0123abcd": "file",             # atomic_write
        ".metrics.jsonl.k2j4_9zq.tmp": "file",                  # atomic_write of earlier versions (mkstemp)
        ".adapter.tmp-41-89abcdef": "dir",                      # write_files of the final adapter
        f"{CHECKPOINTS}/.step-0000005.tmp-41-00ff00ff": "dir",  # staged checkpoint
        f"{CHECKPOINTS}/.step-0000003.trash-41-deadbeef": "dir",  # pruned checkpoint, half-deleted
        f"{CHECKPOINTS}/.tmp-step-0000006": "dir",              # the checkpoint temporary of earlier versions
        "adapter/.adapter_config.json.tmp-41-cafebabe": "file",  # write_files without renameat2
    }
    kept = ["notes.txt", ".hidden", f"{CHECKPOINTS}/step-0000004", "adapter/adapter_config.json",
            ".adapter_config.json.bak"]
    for name, kind in leftovers.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            path.mkdir()
            (path / "half.safetensors").write_bytes(b"half")
        else:
            path.write_text("half")
    for name in kept[:2] + kept[3:]:
        (tmp_path / name).write_text("mine")
    assert sorted(remove_run_leftovers(tmp_path)) == sorted(leftovers)
    assert all((tmp_path / name).exists() for name in kept)
    assert remove_run_leftovers(tmp_path) == []
