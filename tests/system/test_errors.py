"""How a job on two real ranks ends (issue 16, Why 7): an error one rank alone sees is that rank's
one line and ends the job within seconds; a SIGTERM to ``knl-train launch`` stops the run with a
checkpoint, names the signal and exits 0."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from knl_train.train.checkpoint import latest_state
from tests.support import KNL_TRAIN

pytestmark = [pytest.mark.mpi, pytest.mark.slow]  # each test trains on 2 ranks for 15-40 s

BAD_LABEL = 99


def train_args(run, *extra):
    return [KNL_TRAIN, "train", "--set", "data.image_size=16", "--set", f"run_dir={run}",
            "--set", "per_rank_batch=8", "--set", "log_every=10", "--set", "guard.every=10", *extra]


@pytest.fixture(scope="module")
def rank1_bad_labels(tiny_dataset, tmp_path_factory):
    """The tiny dataset as one TFRecord file whose odd records carry label 99. One file for two
    ranks is read record by record, every other record to each: only rank 1 meets a bad label."""
    import tensorflow as tf
    from knl_train.data import tfrecord
    out = tmp_path_factory.mktemp("rank1_bad_labels")
    tfrecord.to_tfrecord(tiny_dataset, out, shards=1, workers=1, progress=False)
    (train,) = out.glob("train-*")
    records = list(tf.data.TFRecordDataset(str(train)).as_numpy_iterator())
    with tf.io.TFRecordWriter(str(train)) as w:
        for i, raw in enumerate(records):
            example = tf.train.Example.FromString(raw)
            if i % 2:
                example.features.feature["image/class/label"].int64_list.value[:] = [BAD_LABEL]
            w.write(example.SerializeToString())
    return out


def test_an_error_only_rank_1_sees_is_its_one_line_and_the_job_ends_within_seconds(
        background, rank1_bad_labels, tmp_path):
    job = background(*train_args(tmp_path / "run", "--set", "data.format=tfrecord",
                                 "--set", f"data.path={rank1_bad_labels}", "--set", "epochs=2"))
    job.wait_for(r"^knl-train: error \(rank 1\): label 99 .*train-00000-of-00001 is outside \[0, 4\)")
    t0 = time.monotonic()
    rc = job.wait(timeout=60)
    elapsed = time.monotonic() - t0
    print(f"job ended {elapsed:.1f} s after rank 1's line")
    assert rc == 2, job.output
    assert elapsed < 10, job.output  # mpirun's kill grace alone is 20 s
    assert job.output.count("knl-train: error") == 1, job.output  # no other rank's line
    assert "mpirun detected" not in job.output  # every rank left cleanly: no mpirun banner
    assert "Traceback" not in job.output and "shut down" not in job.output


def test_sigterm_to_launch_checkpoints_names_the_signal_and_exits_0(background, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    job = background(*train_args(run, "--set", f"data.path={tiny_dataset}", "--set", "epochs=50"))
    job.wait_for(r"^  step +20 ")
    os.kill(job.proc.pid, signal.SIGTERM)  # launch alone, as `kill` or a job script's trap does
    t0 = time.monotonic()
    rc = job.wait(timeout=90)
    print(f"job ended {time.monotonic() - t0:.1f} s after the SIGTERM")
    assert rc == 0, job.output
    found = re.findall(r"^knl-train: stopped by SIGTERM at step (\d+): checkpoint (\S+) written; "
                       r"rerun the same command to resume from it$", job.output, re.M)
    assert len(found) == 1, job.output
    step, checkpoint = int(found[0][0]), found[0][1]
    assert step > 20 and checkpoint == str(run / "checkpoints" / f"step-{step:08d}")
    assert latest_state(run / "checkpoints")["step"] == step
    assert "Traceback" not in job.output


def test_under_gloo_too_the_error_is_rank_1s_one_line_and_the_job_fails(launch, rank1_bad_labels, tmp_path):
    t0 = time.monotonic()
    proc = launch(*train_args(tmp_path / "run", "--set", "data.format=tfrecord",
                              "--set", f"data.path={rank1_bad_labels}", "--set", "epochs=2"),
                  controller="gloo", timeout=240)
    print(f"gloo job: {time.monotonic() - t0:.1f} s in all")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    # horovodrun puts "[rank]<stream>:" before each line of a rank.
    lines = re.findall(r"knl-train: error.*", out)
    assert len(lines) == 1, out
    assert re.match(r"knl-train: error \(rank 1\): label 99 .*is outside \[0, 4\)", lines[0]), out
    assert "Traceback" not in out and "shut down" not in out
