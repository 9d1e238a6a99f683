"""The end of a run: loss.png and the one-screen summary, read from metrics.jsonl."""

import json
import struct
import sys

import pytest

from lorakit.train import summary

from conftest import make_tiny_model_dir, train_tiny, write_copy_task

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    return make_tiny_model_dir(root / "model"), write_copy_task(root / "data.jsonl", n=64)


def run(setup, out, **kw):
    return train_tiny(*setup, out, **(dict(max_steps=8, val_fraction=0.15, eval_every=4) | kw))


def test_a_run_ends_with_a_loss_plot_and_a_summary(setup, tmp_path, capsys):
    result = run(setup, tmp_path)
    printed = capsys.readouterr().out
    png = tmp_path / "loss.png"
    assert result["loss_plot"] == str(png)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))  # matplotlib reads back what it wrote
    width, height = png_size(png)
    assert (width, height) == (summary.PLOT_SIZE[0] * summary.PLOT_DPI, summary.PLOT_SIZE[1] * summary.PLOT_DPI)
    assert pixels.shape[:2] == (height, width)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert [r["step"] for r in evals] == [4, 8]
    assert (result["best_val_loss"], result["best_val_step"]) == (best["val_loss"], best["step"])
    assert result["tokens"] == [r for r in records if "loss" in r][-1]["tokens"] > 0
    assert str(tmp_path / "adapter") in printed and str(png) in printed
    assert f"best val loss    {best['val_loss']:.4f} (step {best['step']})" in printed
    assert "steps            8" in printed


@pytest.mark.parametrize("log_every", [1, 3])  # 3: the checkpoint's step (4) has no metrics record
def test_the_figures_cover_the_whole_run_after_a_resume(setup, tmp_path, log_every):
    run(setup, tmp_path / "ref", quiet=True, log_every=log_every)
    out = tmp_path / "resumed"
    run(setup, out, max_steps=8, save_every=4, quiet=True, log_every=log_every)
    # keep the checkpoint at step 4 and the records up to it, as if the run had been killed after step 5
    records = (out / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in records if json.loads(line)["step"] <= 5]
    (out / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000008")
    shutil.rmtree(out / "adapter")
    resumed = run(setup, out, save_every=4, resume=True, quiet=True, log_every=log_every)
    reference = summary.run_figures(tmp_path / "ref" / "metrics.jsonl")
    assert resumed["steps"] == 8 and resumed["tokens"] == reference["tokens"]  # earlier steps counted
    steps, evals = summary.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(log_every, 9, log_every)) + ([8] if 8 % log_every else [])
    assert [r["step"] for r in evals] == [4, 8]
    assert [r["tokens"] for r in steps] == [r["tokens"] for r in summary.read_metrics(tmp_path / "ref" / "metrics.jsonl")[0]]
    elapsed = [r["elapsed_s"] for r in steps]
    assert elapsed == sorted(elapsed)  # cumulative across the resume
    assert resumed["best_val_loss"] == pytest.approx(reference["best_val_loss"], rel=1e-4)
    assert (out / "loss.png").is_file()


def test_without_matplotlib_the_plot_is_skipped_with_one_note(tmp_path, monkeypatch, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0, "tokens": 10, "elapsed_s": 1.0}\n'
                       '{"step": 1, "val_loss": 1.5, "elapsed_s": 1.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert summary.plot_loss(metrics, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
    figures = summary.run_figures(metrics)
    assert figures == {"steps": 1, "tokens": 10, "wall_seconds": 1.5, "tokens_per_s": 10 / 1.5, "train_loss": 2.0,
                       "best_val_loss": 1.5, "best_val_step": 1}
    text = summary.format_summary(figures, tmp_path / "adapter", None)
    assert "loss curve" not in text and "best val loss    1.5000 (step 1)" in text
