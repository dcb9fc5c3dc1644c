"""Stragglers from hand-made epoch records, and the scaling report's section."""

from __future__ import annotations

import json

from knl_train import records
from knl_train.studies import report as rep
from knl_train.studies import stragglers

from tests.unit.studies.test_report import weak_study


def epoch(n, median, slow):
    """An epoch record with a busy-time median and slow_ranks [[rank, host, busy], ...]."""
    return {"kind": "epoch", "epoch": n, "step": 30 * n, "images_per_sec": 100.0,
            "epoch_seconds": 9.0, "busy_step_seconds_median": median,
            "busy_step_seconds_max": max([median] + [b for _, _, b in slow]),
            "slowest_rank": slow[0][0] if slow else 0, "slowest_host": "n1", "slow_ranks": slow}


def write_metrics(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / records.METRICS).write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_ranks_slower_than_the_median_after_the_first_epoch(tmp_path):
    write_metrics(tmp_path, [
        epoch(1, 0.10, [[5, "n3", 0.30]]),                   # warm-up epoch: left out
        epoch(2, 0.10, [[2, "n2", 0.125], [3, "n2", 0.115]]),
        epoch(3, 0.10, [[2, "n2", 0.120]]),
        {"kind": "step", "step": 95, "images_per_sec": 10.0},
    ])
    found = stragglers.of_run(tmp_path)
    assert found.epochs == 2
    assert [(s.rank, s.host, round(s.worst, 3), s.epochs, s.of_epochs) for s in found.ranks] == [
        (2, "n2", 1.25, 2, 2), (3, "n2", 1.15, 1, 2)]
    assert found.nodes == {"n2": [2, 3]}


def test_no_per_rank_times_no_stragglers_and_unreadable_metrics_are_none(tmp_path):
    write_metrics(tmp_path / "one", [{"kind": "epoch", "epoch": 1, "step": 30,
                                      "images_per_sec": 1.0, "epoch_seconds": 9.0}])
    assert stragglers.of_run(tmp_path / "one") == stragglers.RunStragglers([], {}, 0)
    write_metrics(tmp_path / "even", [epoch(1, 0.1, []), epoch(2, 0.1, [])])
    assert stragglers.of_run(tmp_path / "even") == stragglers.RunStragglers([], {}, 1)
    assert stragglers.of_run(tmp_path / "absent") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / records.METRICS).write_text("not json\n{}\n")
    assert stragglers.of_run(tmp_path / "bad") is None


def test_the_scaling_report_lists_straggling_ranks_and_nodes(tmp_path):
    root = weak_study(tmp_path)
    run = root / "points" / "n0004" / "run-1"
    lines = (run / records.METRICS).read_text().splitlines()
    lines = [l for l in lines if '"epoch"' not in l]
    lines += [json.dumps(epoch(1, 0.2, [])), json.dumps(epoch(2, 0.2, [[7, "c12", 0.26], [6, "c12", 0.23]]))]
    (run / records.METRICS).write_text("\n".join(lines) + "\n")
    md = rep.report(root)["md"].read_text()
    section = md.split("## Stragglers\n")[1]
    assert "exceeded the median over the run's ranks by more than 10% in an epoch after the first " \
           "(1 run(s) with per-rank times)" in section
    assert "- point n0004 (points/n0004/run-1): rank 7 on node c12, busy 1.30x the median in 1 of 1 epoch(s)" in section
    assert "- point n0004 (points/n0004/run-1): rank 6 on node c12, busy 1.15x the median" in section
    assert "- point n0004 (points/n0004/run-1): node c12 holds 2 straggling ranks (6, 7)" in section


def test_the_scaling_report_says_none_when_ranks_were_even_and_nothing_without_times(tmp_path):
    root = weak_study(tmp_path)
    assert "## Stragglers" not in rep.report(root)["md"].read_text()
    run = root / "points" / "n0001" / "run-0"
    with open(run / records.METRICS, "a") as f:
        f.write(json.dumps(epoch(2, 0.2, [])) + "\n")
    md = rep.report(root)["md"].read_text()
    assert "- none: no rank was more than 10% slower than the median." in md.split("## Stragglers")[1]
