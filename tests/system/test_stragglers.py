"""Stragglers on real ranks: a rank slowed from outside is named the slowest in the epoch
records, through its busy step time (its step time less its wait in the gradient allreduce),
although in lock-step every rank's wall step time is the same."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.support import KNL_TRAIN, read_jsonl

pytestmark = pytest.mark.slow


def slow_down(proc, stop: threading.Event, duty=0.5, period=0.02):
    """Hold ``proc`` stopped for ``duty`` of every ``period`` seconds: a rank with half a core,
    whatever else the host runs (a busy loop on its core was evened out by the host's load)."""
    while not stop.is_set():
        proc.send_signal(signal.SIGSTOP)
        time.sleep(period * duty)  # the slow-down itself, not a synchronisation
        proc.send_signal(signal.SIGCONT)
        time.sleep(period * (1 - duty))


def test_a_slowed_rank_is_the_slowest_in_the_epoch_records(background, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    job = background(KNL_TRAIN, "train", "--set", f"data.path={tiny_dataset}", "--set", "data.image_size=16",
                     "--set", f"run_dir={run}", "--set", "per_rank_batch=24", "--set", "log_every=5",
                     "--set", "guard.every=2", "--set", "epochs=4")
    job.wait_for(r"^epoch 1/4 ")
    stop = threading.Event()
    slowing = threading.Thread(target=slow_down, args=(job.ranks()[1], stop), daemon=True)
    slowing.start()
    try:
        job.wait_for(r"^epoch 4/4 ")
    finally:
        stop.set()
        slowing.join()
    assert job.wait(timeout=120) == 0, job.output
    last = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    print({k: v for k, v in last.items() if "busy" in k or "slow" in k})
    # Half-stopped, rank 1 was about 1.4 times as busy as rank 0 (max/median of two: 1.15).
    assert last["slowest_rank"] == 1 and last["busy_spread"] > 1.1
    assert [r for r, _, _ in last["slow_ranks"]] == [1]  # over 1.1 x the median: a straggler
    assert last["slow_ranks"][0][2] == pytest.approx(last["busy_step_seconds_max"])
