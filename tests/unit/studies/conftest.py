"""Fixtures of the local scheduler's tests (test_localqueue.py, test_localrunner.py and
schedulers/test_local.py)."""

from __future__ import annotations

import os

import pytest

from knl_train.studies.localqueue import Queue, queue_dir


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """The submitter's environment, with a local queue of this test's own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return dict(os.environ)


@pytest.fixture()
def queue(env):
    """That queue, its directories made."""
    return Queue(queue_dir(env)).prepare()
