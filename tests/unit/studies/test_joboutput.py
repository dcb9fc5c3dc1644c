"""A point's job output: the newest file of each backend's naming, and its last knl-train error."""

from __future__ import annotations

import os

from knl_train.studies import joboutput


def _write(d, name: str, text: str, mtime: int) -> None:
    (d / name).write_text(text)
    os.utime(d / name, (mtime, mtime))


def test_newest_of_every_backends_names(tmp_path):
    for i, name in enumerate(("slurm-5.out", "slurm-6_2.out", "lb-p1.o1234", "lb-p1.o1235.3",
                              "local-7.out")):
        _write(tmp_path, name, "", 1_000_000 + i)
        assert joboutput.newest(tmp_path) == tmp_path / name
    # Not job outputs: the job's record, a script, a directory named like an output.
    _write(tmp_path, "job-7.json", "{}", 2_000_000)
    _write(tmp_path, "job.sbatch", "", 2_000_000)
    (tmp_path / "run-0.out").mkdir()
    assert joboutput.newest(tmp_path) == tmp_path / "local-7.out"
    assert joboutput.newest(tmp_path / "absent") is None
    assert joboutput.read(tmp_path / "absent") is None


def test_the_last_error_line_whoever_said_it(tmp_path):
    _write(tmp_path, "slurm-9.out",
           "knl-train: error: first\n"
           "[1,0]<stderr>:knl-train: error (rank 1): dataset path /x does not exist\r\n"
           "knl-train: warning: not an error\n"
           "mpirun detected that one or more processes exited with non-zero status\n", 1)
    out = joboutput.read(tmp_path)
    assert out.path == tmp_path / "slurm-9.out"
    assert out.error == "dataset path /x does not exist"
    assert out.says("non-zero status") and not out.says("the loss is not finite")


def test_only_the_tail_is_read_and_no_error_is_none(tmp_path):
    head = "knl-train: error: long ago\n"
    _write(tmp_path, "local-3.out", head + "x" * joboutput.TAIL + "\nkilled\n", 1)
    out = joboutput.read(tmp_path)
    assert out.error is None and out.tail.endswith("killed\n")
    assert len(out.tail) == joboutput.TAIL
