"""Trainer pieces that need no ranks: the per-rank default thread count."""

from __future__ import annotations

import os

import pytest

from knl_train.train import trainer


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
    assert trainer.default_intra_threads(local_size, data_threads) == expected
