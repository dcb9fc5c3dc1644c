"""The stall watchdog's parts that need no second rank: its limit, its reports, the one line it
prints, and the batches it counts (knl_train/dist/watchdog.py). The stalls themselves, on real
ranks, are in tests/system/test_stall.py."""

from __future__ import annotations

import json
import time

from knl_train.dist import watchdog as wd

IDS = [("n1", 100), ("n2", 201), ("n3", 302)]


def report(rank, step, phase="step", done=40, taken=41, where="trainer.py:1 in _fit"):
    return {"token": "t", "rank": rank, "host": IDS[rank][0], "pid": IDS[rank][1], "step": step,
            "done": done, "taken": taken, "phase": phase, "where": where}


def test_the_limit_is_the_stall_plus_the_longest_step_and_a_tracing_allowance():
    w = wd.Watchdog("/nonexistent", rank=0, size=2, stall_seconds=10, startup_seconds=30)
    w.step_begins()                       # the first step traces
    assert w.limit() == 40
    w.step_ends(1)
    assert w.limit() == 10                # the first step's time is not a step's
    w.step_begins()
    w._step_began -= 2.5                  # a step of 2.5 s
    w.step_ends(2)
    assert (w.step, w.done, w.phase) == (2, 2, "after step") and 12.4 < w.limit() < 12.6
    w.mark("evaluation", tracing=True)
    assert w.limit() == 40
    w.mark("evaluation")
    assert 12.4 < w.limit() < 12.6


def test_a_silent_rank_a_starved_rank_and_the_waiting_ones_in_one_line():
    reports = {0: report(0, 40), 2: report(2, 40, done=40, taken=40)}
    line = wd.describe(reports, IDS, 3, quiet=12.3, limit=11.0)
    assert line == (
        "no progress for 12 s (limit 11 s: guard.stall_seconds plus the longest step): rank 1 "
        "(n2, pid 201) stopped responding after step 40 (stopped, hung, or its node lost); rank 2 "
        "(n3, pid 302) waited for input after step 40 (a read that does not return, or a data "
        "pipeline that yields nothing); rank 0 waited in step 41. Check the named ranks' nodes (a "
        "stopped process, a hung file system, a FIFO or unreachable file among the data); "
        "rerunning resumes from the last checkpoint")


def test_ranks_elsewhere_say_where_and_long_lists_are_cut():
    reports = {0: report(0, 30, phase="checkpoint", where="control.py:9 in save")}
    reports.update({r: report(r % 3, 30, phase="agreement") | {"rank": r} for r in range(1, 12)})
    line = wd.describe(reports, IDS * 4, 12, quiet=6, limit=5)
    assert "rank 0 waited in checkpoint after step 30 (control.py:9 in save); " in line
    assert ("ranks 1, 2, 3, 4, 5, 6, 7, 8 and 3 more waited in agreement after step 30 "
            "(trainer.py:1 in _fit).") in line
    assert "stopped responding" not in line


def test_reports_of_another_run_or_damaged_ones_are_ignored(tmp_path):
    (tmp_path / "rank-00000.json").write_text(json.dumps(report(0, 5)))
    (tmp_path / "rank-00001.json").write_text(json.dumps(report(1, 5) | {"token": "old"}))
    (tmp_path / "rank-00002.json").write_text("{cut")
    (tmp_path / "notes.txt").write_text("x")
    assert list(wd.read_reports(tmp_path, "t")) == [0]
    assert wd.read_reports(tmp_path / "absent", "t") == {}


def test_a_report_says_where_the_main_thread_is(tmp_path):
    w = wd.Watchdog(tmp_path, rank=1, size=2, stall_seconds=5)
    w.arm(IDS, token="tok")
    w.disarm()
    w.step_begins()
    r = w.report(6.04)
    assert (r["token"], r["rank"], r["host"], r["pid"], r["phase"], r["quiet_seconds"]) == \
        ("tok", 1, "n2", 201, "step", 6.0)
    assert r["where"].startswith("test_watchdog.py:") and r["where"].endswith(
        "in test_a_report_says_where_the_main_thread_is")


def test_arming_clears_old_reports_on_rank_0_and_a_disarmed_watch_never_fires(tmp_path):
    (tmp_path / "stall").mkdir()
    (tmp_path / "stall" / "rank-00003.json").write_text("{}")
    w = wd.Watchdog(tmp_path, rank=0, size=2, stall_seconds=0.2)
    w.arm(IDS, token="t")
    assert not list((tmp_path / "stall").iterdir())
    w.disarm()
    time.sleep(0.6)  # three polls past the limit: a disarmed watch stays quiet (the process lives)
    assert w._thread.is_alive() and not list((tmp_path / "stall").iterdir())


def test_the_training_stream_counts_the_batches_taken():
    import tensorflow as tf
    w = wd.Watchdog("/nonexistent", rank=0, size=2, stall_seconds=5)
    ds = w.counted(tf.data.Dataset.from_tensor_slices((tf.range(5), tf.range(5) * 2)).batch(2))
    it = iter(ds)
    x, y = next(it)
    # tf.data's injected prefetch may have made the next batch already; never fewer.
    assert (x.numpy().tolist(), y.numpy().tolist()) == ([0, 1], [0, 2]) and w.taken in (1, 2)
    assert [b[0].numpy().tolist() for b in it] == [[2, 3], [4]] and w.taken == 3
    assert wd.NO_WATCH.counted(ds) is ds
