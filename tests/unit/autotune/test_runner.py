"""The autotuner's runner (knl_train/autotune/runner.py): what a trial inherits from the caller."""

from __future__ import annotations

import os

from knl_train.autotune import runner
from knl_train.runtime import itex, rankenv


def test_trials_inherit_no_rank_variable_and_no_side_itex():
    rank_vars = {var: "1" for _, var, _ in rankenv.field_docs()}
    environ = {**rank_vars, **{v: "x" for v in rankenv.THREADING_VARS}, "MKL_NUM_THREADS": "4",
               "TF_CPP_MIN_LOG_LEVEL": "0", "HOME": "/home/me",
               "PYTHONPATH": f"/src{os.pathsep}{itex.side_dir()}"}
    env = runner.trial_env(environ)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "0", "HOME": "/home/me", "PYTHONPATH": "/src"}
    assert runner.trial_env({})["TF_CPP_MIN_LOG_LEVEL"] == "2"
