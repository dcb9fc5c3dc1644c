"""The monitor's writes (knl_train/train/monitor.py, through knl_train/records.py) when the run
directory stops taking them: one line naming the file and the OS's reason, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from knl_train import records
from knl_train.errors import UserError
from tests.support import ROOT, clean_env

STEP = records.StepRecord(step=10, epoch=1, loss=1.0, top1=0.5, top5=0.9, lr=0.1, images_per_sec=100.0,
                          images_per_sec_per_rank=50.0, step_seconds=0.16)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here to fill a disk with")
def test_a_full_disk_at_a_metrics_line_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full")  # every write: ENOSPC, as on a full file system
    with pytest.raises(UserError) as e:
        records.append(path, STEP)
    assert str(e.value) == (f"could not write {path}: No space left on device; free space or fix "
                            "the run directory's permissions, then rerun to resume from the last "
                            "checkpoint")


def test_a_metrics_file_that_cannot_be_opened_is_one_line(tmp_path):
    path = tmp_path / "gone" / "metrics.jsonl"  # its directory vanished (deleted, unmounted)
    with pytest.raises(UserError, match=f"^could not write {path}: No such file or directory; "):
        records.append(path, STEP)


# A real TensorBoard writer whose next flush would grow its file past the size limit (EFBIG: Python ignores
# SIGXFSZ), as a full disk would fail it; in a child, since the limit is the whole process's.
TENSORBOARD = """
import glob, os, resource, sys
import tensorflow as tf
from knl_train.errors import UserError
from knl_train.train.monitor import tensorboard_errors
writer = tf.summary.create_file_writer(sys.argv[1])
with writer.as_default(step=0):
    tf.summary.scalar("a", 1.0)
(events,) = glob.glob(sys.argv[1] + "/events.out.tfevents.*")
limit = os.path.getsize(events)  # not one byte more
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    with tensorboard_errors(sys.argv[1]), writer.as_default(step=1):
        tf.summary.scalar("a", 2.0)
except UserError as e:
    print(e)
"""


def test_a_failed_tensorboard_write_is_one_line_naming_the_events_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", TENSORBOARD, str(tmp_path / "tb")], capture_output=True,
                          text=True, env={**clean_env(), "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert proc.stdout == (f"could not write TensorBoard events in {tmp_path / 'tb'}: {events}; File "
                           "too large; free space or fix the run directory's permissions, then "
                           "rerun to resume from the last checkpoint\n")
