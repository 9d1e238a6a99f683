"""Folders written whole: `kill -9` at any instant of repeated saves leaves every adapter folder
complete, the old one or the new one (a real child process, killed by the test)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lorakit import PeftModel
from lorakit import files
from lorakit.files import remove_leftovers

from conftest import tiny_llama

CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import perturb_trainables, tiny_llama
    from lorakit import LoraConfig, get_peft_model
    models = []
    for r in (4, 8):  # two ranks: a config of one with the weights of the other would not load
        m = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        perturb_trainables(m, seed=r)
        models.append(m)
    out = {out!r}
    i = 0
    while True:
        models[i % 2].save_pretrained(out + "/same")          # an existing folder, replaced again and again
        models[i % 2].save_pretrained(out + f"/new-{{i}}")    # a folder that does not exist yet
        if i == 0:
            print("saving", flush=True)
        i += 1
""")


@pytest.mark.slow
def test_kill_9_during_repeated_saves_never_leaves_a_broken_folder(tmp_path):
    rng = random.Random(0)
    tests = os.path.dirname(os.path.abspath(__file__))
    tried = 0
    for round_ in range(10):
        out = tmp_path / f"round-{round_}"
        out.mkdir()
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=tests, out=str(out))],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "saving"
        time.sleep(rng.uniform(0.0, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        for folder in sorted(out.iterdir()):
            if folder.name.startswith("."):
                continue  # a temporary folder: removed by the next save (below)
            tried += 1
            PeftModel.from_pretrained(tiny_llama(), str(folder))  # strict: config and weights agree
        remove_leftovers(out / "same")
        assert not [p for p in out.iterdir() if p.name.startswith(".same.tmp-")]
    assert tried >= 20


# --- replacing a folder where no atomic exchange exists -----------------------------------------

def folder_with(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights").write_text(text)
    return path


def test_without_an_exchange_a_folder_is_replaced_by_renaming_the_old_one_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = folder_with(tmp_path / "adapter", "old")
    with files.staged_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and os.listdir(tmp_path) == ["adapter"]


def test_without_an_exchange_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = folder_with(tmp_path / "adapter", "old")
    replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder taking the name
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk gone"), files.staged_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old" and os.listdir(tmp_path) == ["adapter"]


def test_a_kill_while_the_old_folder_is_aside_gives_it_its_name_back(tmp_path):
    out = folder_with(tmp_path / "adapter", "old")
    os.rename(out, tmp_path / files.temporary_name("adapter", "old"))  # killed here: no "adapter" at all
    folder_with(tmp_path / files.temporary_name("adapter"), "half")  # and the new one half-written
    remove_leftovers(out)  # what the next write (or a run's start) does first
    assert (out / "weights").read_text() == "old" and os.listdir(tmp_path) == ["adapter"]
    os.rename(out, tmp_path / files.temporary_name("adapter", "old"))
    assert files.remove_temporaries(tmp_path) == [] and (out / "weights").read_text() == "old"
