"""The autotuner on real (small) trials through mpirun: the grid's files, a greedy stage, a
failing trial. The search logic against a fake measure is in tests/unit/autotune."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import pytest

from knl_train.autotune import runner
from knl_train.cli import tune as tune_cli
from knl_train.errors import UserError
from knl_train.runtime import itex
from knl_train.tuning import preset, topology

pytestmark = pytest.mark.mpi  # every trial runs under mpirun


SMALL = ["--model", "small_cnn", "--image-size", "32", "--batch", "8", "--classes", "10",
         "--warmup", "2", "--steps", "3", "--repeats", "2"]


def tune(tmp_path, *argv):
    """``knl-train tune`` in this process (it prints the table); the results.json record."""
    p = argparse.ArgumentParser()
    tune_cli.add_arguments(p)
    return tune_cli.tune(p.parse_args([*SMALL, "--out", str(tmp_path), "--quiet", *argv])).to_dict()


@pytest.mark.slow
def test_real_grid_writes_table_preset_chart_and_json(tmp_path, capsys):
    # TF's defaults, 2 ranks, and 2 ranks with ITEX (if installed): 2 interleaved repeats each.
    record = tune(tmp_path, "--strategy", "grid", "--onednn", "on", "--itex", "off,on",
                  "--ranks", "2", "--spare-cores", "0", "--inter-op", "1", "--blocktime", "1",
                  "--name", "tuned-test")
    has_itex = itex.side_version() is not None and not itex.site_version()
    rows = record["candidates"]
    assert sorted(r["label"] for r in rows) == sorted(
        ["TF defaults", "2 ranks"] + (["ITEX, 2 ranks"] if has_itex else []))

    # JSON: every median is the median of that candidate's trials, in the order they ran
    for row in rows:
        ips = [t["images_per_sec"] for t in record["trials"] if t["candidate"] == row["id"]]
        assert row["samples"] == ips and len(ips) == 2
        assert row["median"] == pytest.approx(statistics.median(ips))
        assert row["min"] == min(ips) and row["max"] == max(ips)
    assert json.loads((tmp_path / "results.json").read_text())["candidates"] == rows
    base = next(r for r in rows if r["baseline"])
    assert record["baseline_images_per_sec"] == pytest.approx(base["median"])
    best = rows[0]
    assert best["median"] == max(r["median"] for r in rows)
    assert record["speedup"] == pytest.approx(best["median"] / base["median"])
    # the trials ran what they claim: TF's own thread pools, or one thread per rank's core
    threads = {t["candidate"]: t["threads"] for t in record["trials"]}
    assert threads[base["id"]]["intra_op_requested"] == 0 and threads[base["id"]]["intra_op_tf"] == 0
    two = next(r for r in rows if r["label"] == "2 ranks")
    assert threads[two["id"]]["intra_op_tf"] == 1 and len(threads[two["id"]]["cpus_allowed"]) == 1

    # the table, printed and written
    out = capsys.readouterr().out
    assert "| # | setting |" in out and f"{best['label']} **(best)**" in out
    assert (tmp_path / "table.md").read_text() in out

    # the preset: loads, carries the best setting and what was measured
    p = preset.load(str(tmp_path / "tuned-test.yaml"))
    assert p.name == "tuned-test" and p.ranks_per_node == best["ranks"]
    if not best["baseline"]:
        assert dataclasses.asdict(p.settings) == best["settings"]
    assert p.measured["images_per_sec"] == round(best["median"], 2)
    assert p.measured["model"] == "small_cnn" and p.measured["precision"] == "fp32"
    # It names the CPU it was measured on, so using it elsewhere warns; it is never auto-chosen.
    live = topology.detect()
    assert p.match.vendor == live.vendor and p.matches(live)
    assert p.name not in preset.names() and preset.detect(live).name != p.name

    png = (tmp_path / "tuning.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.mark.slow
def test_real_greedy_keeps_a_change_only_if_its_median_wins(tmp_path, capsys):
    # One stage: TF's defaults against inter-op 1 (TF uses one inter-op thread per CPU).
    record = tune(tmp_path, "--onednn", "on", "--itex", "off", "--ranks", "1", "--inter-op", "1",
                  "--min-gain", "0")
    (stage,) = record["stages"]
    (_, incumbent), (_, rival) = stage["compared"]
    assert stage["dimension"] == "inter_op" and stage["changed"] == (rival > incumbent)
    assert record["best"]["label"] == stage["chosen"]
    assert "## Search" in capsys.readouterr().out


def test_a_failing_trial_stops_the_search_with_its_output(tmp_path):
    with pytest.raises(runner.TrialFailed, match=r"(?s)trial 0 \(TF defaults\) timed out after "
                                                   r"0\.5 s.*command: .*mpirun.*--keep-going"):
        tune(tmp_path, "--timeout", "0.5", "--ranks", "1")
    with pytest.raises(UserError, match="no trial succeeded"):
        tune(tmp_path, "--timeout", "0.5", "--ranks", "1", "--onednn", "on", "--itex", "off",
             "--inter-op", "1", "--keep-going")
