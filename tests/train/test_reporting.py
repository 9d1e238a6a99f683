"""--report-to: metrics.jsonl always, TensorBoard event files read back, wandb/mlflow only when installed."""

import importlib.machinery
import json
import sys
import types

import pytest

from lorakit import cli
from lorakit.train import reporting

from conftest import make_tiny_model_dir, train_tiny, write_copy_task


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file under `log_dir`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    return make_tiny_model_dir(root / "model"), write_copy_task(root / "data.jsonl", n=48)


def test_tensorboard_gets_every_logged_figure(setup, tmp_path):
    train_tiny(*setup, tmp_path, max_steps=6, log_every=2, eval_every=3, val_fraction=0.2, quiet=True,
               report_to="tensorboard")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    got = scalars(tmp_path / "tensorboard")
    assert set(got) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_mib",
                        "eval/loss"}
    for key, tag in reporting.SCALARS.items():
        source = evals if key == "val_loss" else steps
        assert [step for step, _ in got[tag]] == [r["step"] for r in source]
        assert [value for _, value in got[tag]] == pytest.approx([r[key] for r in source], rel=1e-6)  # float32 events
    assert [r["step"] for r in steps] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert all(r["peak_memory_mib"] > 0 for r in steps)


def test_a_resumed_run_replaces_the_redone_steps_in_tensorboard(tmp_path):
    first = reporting.Reporter(tmp_path, "tensorboard")
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.close()  # as if killed after step 5 with a checkpoint at step 3
    resumed = reporting.Reporter(tmp_path, "tensorboard", start=3)
    for step in range(4, 7):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                                                               (6, 60.0)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_a_new_run_into_a_used_folder_shows_only_its_own_steps(tmp_path):
    old = reporting.Reporter(tmp_path, "tensorboard")
    for step in range(1, 6):
        old.log({"step": step, "loss": float(step)})
    old.close()
    new = reporting.Reporter(tmp_path, "tensorboard")  # start=0: a fresh run, not a resume
    for step in range(1, 4):
        new.log({"step": step, "loss": 10.0 * step})
    new.close()
    assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 10.0), (2, 20.0), (3, 30.0)]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_is_one_message_before_the_model_loads(setup, tmp_path, monkeypatch, capsys, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # not importable, even where it is installed
    _, data = setup
    code = cli.main(["train", "--data", str(data), "--model", str(tmp_path / "no-such-model"),
                     "--out", str(tmp_path / "out"), "--report-to", tracker, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"pip install {tracker}" in err and "no-such-model" not in err  # refused before the model folder is read
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_unknown_tracker_is_refused_by_the_cli(setup, tmp_path, capsys):
    _, data = setup
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", str(data), "--out", str(tmp_path), "--report-to", "neptune"])
    assert exit_info.value.code == 2 and "neptune" in capsys.readouterr().err


def fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


def test_wandb_and_mlflow_get_the_config_and_each_record(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("wandb.log", values, step))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(**kwargs):
        calls.append(("wandb.init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    monkeypatch.setitem(sys.modules, "mlflow", fake_module(
        "mlflow", start_run=lambda run_name: calls.append(("mlflow.start_run", run_name)),
        log_params=lambda params: calls.append(("mlflow.log_params", params)),
        log_metrics=lambda values, step: calls.append(("mlflow.log_metrics", values, step)),
        end_run=lambda: calls.append(("mlflow.end_run",))))
    for tracker in ("wandb", "mlflow"):
        reporter = reporting.Reporter(tmp_path / tracker, tracker, run_name="mine",
                                      config={"r": 16, "target_modules": ("q_proj", "v_proj")})
        reporter.log({"step": 2, "loss": 1.5, "lr": 1e-3, "tokens": 80, "grad_norm": float("nan")})
        reporter.log({"step": 2, "val_loss": 1.25})
        reporter.close()
    assert calls == [
        ("wandb.init", {"name": "mine", "dir": str(tmp_path / "wandb"),
                        "config": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}),
        ("wandb.log", {"train/loss": 1.5, "train/lr": 1e-3}, 2),  # not-a-number and untracked keys left out
        ("wandb.log", {"eval/loss": 1.25}, 2),
        ("wandb.finish",),
        ("mlflow.start_run", "mine"),
        ("mlflow.log_params", {"r": "16", "target_modules": "('q_proj', 'v_proj')"}),
        ("mlflow.log_metrics", {"train/loss": 1.5, "train/lr": 1e-3}, 2),
        ("mlflow.log_metrics", {"eval/loss": 1.25}, 2),
        ("mlflow.end_run",),
    ]
