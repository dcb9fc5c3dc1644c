"""The autotuner: search logic against a fake measure, then real (small) trials through mpirun."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import pytest

from knl_train.autotune import runner
from knl_train.autotune.search import greedy, grid, grid_candidates
from knl_train.autotune.space import (Candidate, Machine, Space, baseline, effective, label,
                                      settings_for)
from knl_train.cli import tune as tune_cli
from knl_train.errors import UserError
from knl_train.runtime import itex, rankenv
from knl_train.tuning import preset, topology

TWO_CORES = Machine(cores=2, itex="optional", host="box", cpu="test CPU")


def fake_measure(rate, log=None):
    """A measure whose 'images/s' is ``rate(candidate)`` every time (search logic only)."""
    seen = {}

    def measure(group, dimension):
        if log is not None:
            log.append((dimension, list(group)))
        for c in group:
            seen.setdefault(c, []).append(rate(c))
        return {c: seen[c] for c in group}
    return measure


def rate(c: Candidate) -> float:
    r = 20.0
    r *= 2.0 if c.precision == "mixed_bf16" else 1.0
    r *= 0.5 if not c.onednn else 1.0
    r *= 1.2 if c.itex else 1.0
    r *= 0.9 if c.ranks == 2 else 1.0
    r *= 1.05 if c.inter_op == 1 else 1.0
    r *= 1.1 if c.itex and c.blocktime == 0 else 1.0
    return r


# ---- search logic ------------------------------------------------------------------------------
def test_greedy_walks_the_dimensions_in_order_and_keeps_only_gains():
    log = []
    space = Space(precision=("fp32", "mixed_bf16"), ranks=(1, 2))
    search = greedy(space, TWO_CORES, 16, fake_measure(rate, log))
    # Precision last: the stage before it ends on the best fp32 setting.
    assert [d for d, _ in log] == ["onednn", "itex", "ranks", "inter_op", "blocktime", "precision"]
    for _, group in log:   # the incumbent first, then only real changes
        assert len({effective(c, TWO_CORES) for c in group}) == len(group)
    assert search.final == Candidate(precision="mixed_bf16", itex=True, inter_op=1, blocktime=0)
    assert label(search.final, TWO_CORES) == "bf16, ITEX, inter-op 1, blocktime 0"
    assert [s.chosen != s.incumbent for s in search.stages] == [False, True, False, True, True, True]
    assert search.stages[-1].incumbent == Candidate(itex=True, inter_op=1, blocktime=0)
    # inter-op 2 is what TF does on a 1-rank, 2-core node: not measured again
    inter = next(g for d, g in log if d == "inter_op")
    assert [effective(c, TWO_CORES).inter_op for c in inter] == [2, 1]
    # spare cores never: a fifth of 2 cores is no core; threads per core: the node has 1
    assert ("spare_cores", "1") in {(d, v) for d, v, _ in search.skipped}


def test_greedy_min_gain_and_blocktime_only_with_itex():
    log = []
    search = greedy(Space(itex=(False,)), TWO_CORES, 16,
                             fake_measure(lambda c: rate(c) * (1.02 if c.ranks == 2 else 1), log),
                             min_gain=0.1)
    assert search.final.baseline              # inter-op 1 gains 5%, 2 ranks lose 8%
    assert "blocktime" not in [d for d, _ in log]
    assert "itex" not in [d for d, _ in log]


def test_greedy_takes_a_failed_incumbent_over_nothing():
    search = greedy(Space(onednn=(True,), itex=(False,), ranks=(1,), inter_op=(1,)),
                             TWO_CORES, 16, lambda group, dim: {group[0]: [], group[1]: [30.0]})
    assert search.final == Candidate(inter_op=1)


def test_candidates_skip_what_cannot_run():
    m = Machine(cores=6, itex="absent")
    cands, skipped = grid_candidates(Space(ranks=(1, 2, 4), inter_op=(1,)), m, 12)
    why = {(d, v): w for d, v, w in skipped}
    assert "do not divide" in why[("ranks", "4")]
    assert "not installed" in why[("itex", "on")]
    assert cands[0].baseline and all(not c.itex and c.ranks in (1, 2) for c in cands)
    # batch 10 splits over 2 ranks but not over 3; Xeon Phi never gets ITEX
    knl = Machine(cores=6, itex="optional", is_knl=True)
    _, skipped = grid_candidates(Space(ranks=(2, 3)), knl, 10)
    why = {(d, v): w for d, v, w in skipped}
    assert "does not split" in why[("ranks", "3")] and "Xeon Phi" in why[("itex", "on")]


def test_grid_is_the_deduplicated_product():
    space = Space(onednn=(True,), itex=(False, True), ranks=(1, 2), spare_cores=(0,),
                  inter_op=(1, 2), blocktime=(0, 1))
    cands, _ = grid_candidates(space, TWO_CORES, 16)
    runs = [effective(c, TWO_CORES) for c in cands]
    assert len(set(runs)) == len(runs)
    # without ITEX blocktime is not read: 1 + 3 (1 rank x inter 1; 2 ranks x inter 1, 2) ...
    assert sum(not c.itex for c in cands) == 4
    # ... with ITEX it is: 4 layout and inter-op combinations x 2 blocktimes
    assert sum(c.itex for c in cands) == 8
    search = grid(space, TWO_CORES, 16, fake_measure(rate))
    assert effective(search.final, TWO_CORES) == effective(
        Candidate(itex=True, inter_op=1, blocktime=0), TWO_CORES)


def test_settings_and_labels():
    c = Candidate(itex=True, ranks=2, inter_op=1, blocktime=0)
    s = settings_for(c, TWO_CORES, preset.Settings(fusion_threshold_mb=64))
    assert (s.itex, s.onednn, s.inter_op, s.kmp_blocktime, s.fusion_threshold_mb) == (True, True, 1, 0, 64)
    # 2 ranks on 2 cores: inter-op 1 is TF's own default there
    assert label(c, TWO_CORES) == "ITEX, 2 ranks, blocktime 0"
    assert label(baseline(TWO_CORES), TWO_CORES) == "TF defaults"
    # TF's inter-op default follows the rank's CPUs
    assert settings_for(Candidate(), Machine(cores=8, threads_per_core=2)).inter_op == 16


def test_trials_inherit_no_rank_variable_and_no_side_itex():
    rank_vars = {var: "1" for _, var, _ in rankenv.field_docs()}
    environ = {**rank_vars, **{v: "x" for v in rankenv.THREADING_VARS}, "MKL_NUM_THREADS": "4",
               "TF_CPP_MIN_LOG_LEVEL": "0", "HOME": "/home/me",
               "PYTHONPATH": f"/src{os.pathsep}{itex.side_dir()}"}
    env = runner.trial_env(environ)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "0", "HOME": "/home/me", "PYTHONPATH": "/src"}
    assert runner.trial_env({})["TF_CPP_MIN_LOG_LEVEL"] == "2"


@pytest.mark.parametrize("argv, message", [
    (["--onednn", "maybe"], "--onednn: 'maybe' is not on or off"),
    (["--ranks", "1,0"], "--ranks: 0 is too small"),
    (["--inter-op", "1,,2"], "--inter-op '1,,2'"),
    (["--precision", "fp16"], "--precision: unknown precision 'fp16'"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--model", "resnet5O"], "--model 'resnet5O' is not in the registry"),
])
def test_bad_option_values_are_named(argv, message):
    p = argparse.ArgumentParser()
    tune_cli.add_arguments(p)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        tune_cli.main(p.parse_args(argv + ["--dry-run"]))


# ---- real trials -------------------------------------------------------------------------------
SMALL = ["--model", "small_cnn", "--image-size", "32", "--batch", "8", "--classes", "10",
         "--warmup", "2", "--steps", "3", "--repeats", "2"]


def tune(tmp_path, *argv):
    """``knl-train tune`` in this process (it prints the table); the results.json record."""
    p = argparse.ArgumentParser()
    tune_cli.add_arguments(p)
    return tune_cli.tune(p.parse_args([*SMALL, "--out", str(tmp_path), "--quiet", *argv])).to_dict()


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
