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


def test_mixed_batch_judges_the_goals_on_the_medians_over_runs():
    from benchmarks.mixed_batch import Result, across_runs

    def run(lorakit, peft):  # a 1-adapter row and a 64-adapter row
        return [Result(1, {}, lorakit=1.05, grouped=1.2, peft=1.2), Result(64, {}, lorakit=lorakit, grouped=1.2, peft=peft)]

    # overheads 0.2, 0.4, 0.1 (median 0.2); forward 1.04x, 1.12x, 1.02x (median 1.04x)
    table = across_runs([run(1.04, 1.2), run(1.12, 1.3), run(1.02, 1.2)])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "1.040x (1.020x to 1.120x)" in rows["64"]
    assert "0.200 (0.100 to 0.400)" in rows["64"]
    assert "overhead <= 0.25 PEFT's: met (in 2 of 3 runs)" in rows["64"]
    assert "<= 1.1x base: met (in 2 of 3 runs)" in rows["64"]
    assert "no slower than PEFT: met (in 3 of 3 runs)" in rows["1"]
    table = across_runs([run(1.12, 1.3), run(1.12, 1.3), run(1.02, 1.2)])
    assert "overhead <= 0.25 PEFT's: NOT met (in 1 of 3 runs)" in table
    assert "<= 1.1x base: NOT met (in 1 of 3 runs)" in table


def test_benchmarks_run_rewrites_only_its_own_section(tmp_path):
    from benchmarks.run import SECTION_END, SECTION_START, write_report

    def report(n):
        return f"{SECTION_START}\n# Benchmarks\n\nreport {n}\n{SECTION_END}"

    path = tmp_path / "benchmarks.md"
    write_report(path, report(1))  # a new file: the report alone
    assert path.read_text() == report(1) + "\n"
    notes = "\n<!-- benchmarks.serve: start -->\nserve table\n<!-- benchmarks.serve: end -->\n\nA note on serving.\n"
    path.write_text(path.read_text() + notes)
    write_report(path, report(2))
    assert path.read_text() == report(2) + "\n" + notes
    path.write_text("<!-- benchmarks.dora: start -->\ndora\n<!-- benchmarks.dora: end -->\nA note.\n")
    write_report(path, report(3))  # a file without the run's section: the report goes on top
    assert path.read_text() == report(3) + "\n\n<!-- benchmarks.dora: start -->\ndora\n<!-- benchmarks.dora: end -->\nA note.\n"


@pytest.mark.parametrize("text", ["<!-- s: start -->\nhalf a section\n", "<!-- s: end -->\n<!-- s: start -->\n",
                                  "<!-- s: start -->a<!-- s: end -->\n<!-- s: start -->b<!-- s: end -->\n"])
def test_write_section_refuses_markers_it_cannot_replace_whole(tmp_path, text):
    """A start without its end (or two sections) would make the next replacement swallow the
    text between them: refused, the file unchanged."""
    path = tmp_path / "benchmarks.md"
    path.write_text(text + "notes to keep\n")
    with pytest.raises(ValueError, match="mend the file by hand"):
        common.write_section(path, "<!-- s: start -->", "<!-- s: end -->", "<!-- s: start -->new<!-- s: end -->")
    assert path.read_text() == text + "notes to keep\n"
