"""The trainer's setup (knl_train/train/setup.py): thread counts from the config, the launcher's
preset, or the CPUs this rank may use."""

from __future__ import annotations

import os

import pytest

from knl_train.train import config as train_config
from knl_train.train import setup
from knl_train.train.config import TrainConfig, ThreadsConfig


@pytest.mark.parametrize("allowed, cpus, local_size, data_threads, expected", [
    ({0}, 2, 2, 1, 1),                 # bound to one core: nothing to spare for decoding
    (set(range(17)), 68, 4, 1, 16),    # KNL, 4 ranks x 17 cores: one core decodes
    (set(range(68)), 68, 1, 4, 64),    # one rank owns the node, 4 decode threads
    (set(range(2)), 2, 3, 1, 1),       # unbound and oversubscribed: at least one thread
    (set(range(48)), 48, 2, 2, 22),    # unbound 2-socket node, 2 ranks: a share each, less 2
    (set(range(8)), 8, 1, 0, 8),       # no decoding (synthetic data)
])
def test_default_intra_threads(monkeypatch, allowed, cpus, local_size, data_threads, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert setup.default_intra_threads(local_size, data_threads) == expected


def test_thread_counts_prefer_the_config_then_the_launchers_preset(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    assert setup.thread_counts(TrainConfig(), 1) == (7, 1)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "6")
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "2")
    assert setup.thread_counts(TrainConfig(), 1) == (6, 2)
    assert setup.thread_counts(TrainConfig(threads=ThreadsConfig(intra_op=3, inter_op=1)), 1) == (3, 1)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "many")
    with pytest.raises(setup.UserError, match="TF_NUM_INTRAOP_THREADS='many'"):
        setup.thread_counts(TrainConfig(), 1)


def test_data_threads_come_from_the_config_then_the_launchers_preset(monkeypatch):
    monkeypatch.delenv("KNL_TRAIN_DATA_THREADS", raising=False)
    assert setup.with_data_threads(TrainConfig()).data.threads == 1
    monkeypatch.setenv("KNL_TRAIN_DATA_THREADS", "3")
    assert setup.with_data_threads(TrainConfig()).data.threads == 3
    cfg = train_config.load(None, ["data.threads=2"])
    assert setup.with_data_threads(cfg).data.threads == 2
