"""The run directory on real ranks (mpirun + Horovod): one owner, a dead owner's lock, another
model, a write that fails.

The tiny dataset has 480 training images; with 8 images per rank on 2 ranks an epoch is 30
optimizer steps.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

from tests.support import KNL_TRAIN

pytestmark = pytest.mark.slow  # four 2-rank runs, most of each spent importing TensorFlow


def train_args(data, run, *extra):
    return [KNL_TRAIN, "train", "--set", f"data.path={data}", "--set", "data.image_size=16",
            "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "log_every=10", *extra]


def one_error(text: str) -> str:
    """The one ``knl-train: error:`` line of ``text`` (and no traceback)."""
    errors = [line for line in text.splitlines() if "knl-train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


def test_one_owner_at_a_time_a_dead_ones_lock_taken_over_and_another_model_refused(
        background, launch, tiny_dataset, tmp_path):
    """A second training on a busy run_dir stops at once naming the owner, which goes on. Once
    the owner is killed (SIGKILL: no exit handler runs), a rerun takes its lock over with a note,
    and, being another model, stops with one line before touching the checkpoints."""
    run = tmp_path / "run"
    first = background(*train_args(tiny_dataset, run, "--set", "epochs=5000"))  # ends when killed
    first.wait_for(r"^  step +10 ")
    owner = first.ranks()[0].pid
    assert json.loads((run / ".knl-train.lock").read_text())["pid"] == owner

    t0 = time.monotonic()
    second = launch(*train_args(tiny_dataset, run, "--set", "epochs=1"))
    print(f"the second training ended {time.monotonic() - t0:.1f} s after its start")
    assert second.returncode == 2, second.stdout + second.stderr
    line = one_error(second.stderr)
    assert line.startswith(f"knl-train: error: run_dir {run} is in use by another training "
                           f"(host {socket.gethostname()}, PID {owner}, started "), line
    assert line.endswith("); wait for it to end or stop it, or set another run_dir"), line
    assert "ranks (mpi)" not in second.stdout  # stopped before its data, model or header
    assert first.proc.poll() is None  # the first goes on, still the owner
    assert json.loads((run / ".knl-train.lock").read_text())["pid"] == owner

    first.wait_for(r"^epoch 2/5000 ")  # epoch 1's checkpoint is complete: epoch 2's waited for it
    first.kill()
    before = sorted(str(p) for p in (run / "checkpoints").rglob("*"))
    third = launch(*train_args(tiny_dataset, run, "--set", "epochs=1", "--set", "model=resnet20"))
    assert third.returncode == 2, third.stdout + third.stderr
    assert f"knl-train: took over {run / '.knl-train.lock'} from host {socket.gethostname()}, " \
           f"PID {owner}, started " in third.stdout
    assert re.fullmatch(
        f"knl-train: error: run_dir {re.escape(str(run))} holds checkpoints of model small_cnn "
        r"\(newest step-0*(\d+), step \1\); this config trains model resnet20: use another run_dir, "
        "or --fresh to discard them", one_error(third.stderr))
    assert sorted(str(p) for p in (run / "checkpoints").rglob("*")) == before


@pytest.mark.parametrize("how", ["read-only", "disk full"])
def test_a_run_dir_that_stops_taking_writes_mid_run_is_one_line(background, tiny_dataset, tmp_path, how):
    if how == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories and files; the disk-full case covers it")
    if how == "disk full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here to fill a disk with")
    run = tmp_path / "run"
    job = background(*train_args(tiny_dataset, run, "--set", "epochs=5000"))  # ends at the failure
    job.wait_for(r"^epoch 1/5000 ")
    metrics = run / "metrics.jsonl"
    if how == "read-only":
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode & 0o555)
        reason = "Permission denied"
    else:  # metrics.jsonl becomes a file on a full disk: every write fails with ENOSPC
        (run / "full").symlink_to("/dev/full")
        os.replace(run / "full", metrics)
        reason = "No space left on device"
    t0 = time.monotonic()
    rc = job.wait(timeout=120)
    print(f"the job ended {time.monotonic() - t0:.1f} s after the run directory stopped taking writes")
    assert rc != 0, job.output
    assert one_error(job.output) == (
        f"knl-train: error: could not write {metrics}: {reason}; free space or fix the run "
        "directory's permissions, then rerun to resume from the last checkpoint")
    if how == "read-only":
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
