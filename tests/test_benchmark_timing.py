"""benchmarks.common.interleave: the order of the variants across rounds (no timings asserted)."""

import pytest

from benchmarks import common


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_balanced_orders_put_every_variant_after_every_other_equally_often(n):
    rows = common.balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    firsts = [row[0] for row in rows]
    assert all(firsts.count(v) == len(rows) // n for v in range(n))
    pairs = [(row[i - 1], row[i]) for row in rows for i in range(1, n)]
    assert sorted(set(pairs)) == [(x, y) for x in range(n) for y in range(n) if x != y]
    assert len(set(map(pairs.count, pairs))) <= 1  # each pair equally often


def test_interleave_runs_one_call_of_each_per_round_in_balanced_orders():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = common.interleave(variants, rounds=4, warmup=1, clock="wall")
    assert {name: len(t) for name, t in times.items()} == {name: 4 for name in "abcd"}
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]  # after the warm-up round
    assert rounds == [["abcd"[k] for k in row] for row in common.balanced_orders(4)]
