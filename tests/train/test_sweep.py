"""Rank sweep on the tiny model: one run per rank, table, CSV, plot and recommendation."""

import csv

import pytest

from lorakit.train.sweep import recommend, sweep

from conftest import make_tiny_model_dir, write_copy_task


def test_recommend_smallest_rank_within_tolerance():
    rows = [{"rank": 4, "best_val_loss": 1.05}, {"rank": 8, "best_val_loss": 1.01}, {"rank": 16, "best_val_loss": 1.0}]
    assert recommend(rows, 0.02)["rank"] == 8
    assert recommend(rows, 0.10)["rank"] == 4
    assert recommend(rows, 0.0)["rank"] == 16


def test_sweep_writes_table_csv_plot(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    data = write_copy_task(tmp_path / "data.jsonl", n=48)
    result = sweep(data=str(data), ranks=[2, 8], out=str(tmp_path / "sweep"), max_steps=6, eval_every=3,
                   model=str(model), batch_size=4, lr=3e-2, target_modules=["all-linear"], quiet=True)
    rows = result["rows"]
    assert [r["rank"] for r in rows] == [2, 8] and [r["lora_alpha"] for r in rows] == [4, 16]
    assert rows[1]["trainable_params"] == 4 * rows[0]["trainable_params"]
    assert rows[1]["adapter_bytes"] > rows[0]["adapter_bytes"]
    assert all(r["peak_memory_mib"] > 0 and r["seconds_per_step"] > 0 for r in rows)
    best = min(r["best_val_loss"] for r in rows)  # the default tolerance is 2%
    assert result["recommended_rank"] == min(r["rank"] for r in rows if r["best_val_loss"] <= best * 1.02)
    out = tmp_path / "sweep"
    with open(out / "sweep.csv") as f:
        assert [int(r["rank"]) for r in csv.DictReader(f)] == [2, 8]
    assert f"recommended rank: {result['recommended_rank']}" in (out / "sweep.txt").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_refuses_empty_ranks(tmp_path):
    with pytest.raises(ValueError, match="--ranks is empty"):
        sweep(data="x.jsonl", ranks=[], out=str(tmp_path))
