"""Stall detection on real ranks: a rank that stops making progress ends the job, naming it.

Two ranks train the tiny dataset (30 steps an epoch) with ``guard.stall_seconds=5``; once they
are past step 10, one rank is stopped (SIGSTOP) or blocked in a read (a FIFO among its images).
The job must end non-zero within the stall bound plus the launcher's clean-up, the one line
naming the stalled rank and the step each reached. Also: the straggler fields a 2-rank run
writes into its epoch records (under mpirun and Gloo).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from tests.support import KNL_TRAIN, read_jsonl

pytestmark = pytest.mark.slow

STALL = 5
# Past step 10, or epoch 1 (horovodrun prefixes its ranks' lines with "[0]<stdout>:").
STEP_10 = r"  step +[1-9]\d+ "
EPOCH_1 = r"^(\[0\]<stdout>:)?epoch 1/50 "
# The watchdog fires STALL s after the last progress (+ the longest step, + a poll of 0.5 s),
# then waits a grace (3 s + the longest step) for the other ranks' reports; the lowest reporter
# prints and leaves. The launcher then ends the rest: mpirun, as ``knl-train launch`` runs it,
# sends SIGCONT and SIGTERM and waits 2 x odls_base_sigkill_timeout (10 s) before SIGKILL and
# its own exit; horovodrun waits 5 s, then up to 5 s more for its shell. Measured on a loaded
# 2-core host, SIGSTOP to job end: 29 s (mpi), 20-21 s (gloo); the margins absorb the load.
GRACE = 4
LAUNCHER = {"mpi": 20, "gloo": 10}
BOUND = {c: STALL + 1 + GRACE + s + 10 for c, s in LAUNCHER.items()}


def stall_args(data, run, *extra):
    return [KNL_TRAIN, "train", "--set", f"data.path={data}", "--set", "data.image_size=16",
            "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "log_every=10",
            "--set", "guard.every=10", "--set", f"guard.stall_seconds={STALL}",
            "--set", "epochs=50", *extra]


def _gone(proc) -> bool:
    import psutil
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _stall_line(output: str) -> str:
    lines = [l for l in output.splitlines() if "no progress for" in l]
    assert len(lines) == 1, output  # one line, from one rank
    return lines[0]


@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_a_stopped_rank_ends_the_job_naming_it_and_its_step(background, tiny_dataset, tmp_path,
                                                            controller):
    job = background(*stall_args(tiny_dataset, tmp_path / "run"), controller=controller)
    job.wait_for(EPOCH_1)
    ranks = job.ranks()
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    rc = job.wait(timeout=90)
    elapsed = time.monotonic() - t0
    print(f"{controller}: job down {elapsed:.1f} s after SIGSTOP")
    line = _stall_line(job.output)
    print(line)
    assert rc != 0 and elapsed < BOUND[controller], (rc, elapsed, job.output)
    m = re.search(r"knl-train: error(?: \(rank 0\))?: no progress for (\d+) s \(limit (\d+) s: guard.stall_seconds "
                  r"plus the longest step\): rank 1 \([^,]+, pid (\d+)\) stopped responding after "
                  r"step (\d+) \(stopped, hung, or its node lost\); rank 0 waited in step (\d+)\. ", line)
    assert m, line
    assert int(m.group(3)) == ranks[1].pid and int(m.group(1)) >= STALL <= int(m.group(2))
    assert int(m.group(5)) == int(m.group(4)) + 1 and int(m.group(4)) >= 10
    assert _gone(ranks[1]) and _gone(ranks[0])  # the stopped rank was killed too
    assert (tmp_path / "run" / "stall" / "rank-00000.json").exists()
    assert_straggler_fields(tmp_path / "run")


def assert_straggler_fields(run):
    """Epoch 1's record carries the spread of the two ranks' busy step times."""
    r = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"][0]
    assert 0 < r["busy_step_seconds_median"] <= r["busy_step_seconds_max"] < r["epoch_seconds"] / 29
    assert r["busy_spread"] == pytest.approx(r["busy_step_seconds_max"] / r["busy_step_seconds_median"])
    assert r["slowest_rank"] in (0, 1) and r["slowest_host"] == os.uname().nodename
    for rank, host, busy in r["slow_ranks"]:
        assert busy > 1.1 * r["busy_step_seconds_median"] and host == r["slowest_host"]


def test_a_rank_blocked_reading_a_fifo_ends_the_job_naming_it(background, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    victim = sorted((data / "train").rglob("*.JPEG"))[5]
    job = background(*stall_args(data, tmp_path / "run"))
    job.wait_for(STEP_10)
    victim.unlink()  # listed at start; read again in a later epoch, it now never returns
    os.mkfifo(victim)
    m = job.wait_for(r"no progress for (\d+) s ", timeout=120)  # once the FIFO is read
    t0 = time.monotonic()
    rc = job.wait(timeout=60)
    print(f"stall seen after {m.group(1)} s without progress; job down {time.monotonic() - t0:.1f} s later")
    line = _stall_line(job.output)
    print(line)
    # The blocked rank's own watchdog reports too, and leaves one grace after the line.
    assert rc != 0 and STALL <= int(m.group(1)) <= STALL + 3, job.output
    assert time.monotonic() - t0 < LAUNCHER["mpi"] + 10, job.output
    m = re.search(r"rank (\d) \([^,]+, pid \d+\) waited for input after step (\d+) \(a read that "
                  r"does not return, or a data pipeline that yields nothing\); rank (\d) waited "
                  r"in step (\d+)\. ", line)
    assert m, line
    assert {m.group(1), m.group(3)} == {"0", "1"} and int(m.group(4)) == int(m.group(2)) + 1
