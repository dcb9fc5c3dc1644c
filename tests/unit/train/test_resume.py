"""Resuming a run (knl_train/train/resume.py) through the command line: no checkpoint is a clear error."""

from __future__ import annotations

from tests.support import KNL_TRAIN, run_cli


def train_args(data, run, *extra):
    return [KNL_TRAIN, "train", "--set", f"data.path={data}", "--set", "data.image_size=16",
            "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "log_every=10",
            "--set", "guard_every=10", *extra]


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    proc = run_cli(*train_args(tiny_dataset, tmp_path / "run")[1:], "--resume")
    assert proc.returncode == 2
    assert f"--resume: there is no checkpoint in {tmp_path / 'run' / 'checkpoints'}" in proc.stderr
    assert "Traceback" not in proc.stderr
