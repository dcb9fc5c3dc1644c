"""Trainer pieces that need no ranks: the per-rank default thread count."""

from __future__ import annotations

import os

import pytest

from knl_train.train import trainer


@pytest.mark.parametrize("allowed, cpus, local_size, expected", [
    ({0}, 2, 2, 1),                 # bound to one core by mpirun --bind-to core
    (set(range(17)), 68, 4, 17),    # KNL, 4 ranks x 17 cores, bound
    (set(range(68)), 68, 1, 68),    # one rank owns the node
    (set(range(2)), 2, 3, 1),       # unbound and oversubscribed: at least one thread
    (set(range(48)), 48, 2, 24),    # unbound 2-socket node, 2 ranks: a share each
])
def test_default_intra_threads(monkeypatch, allowed, cpus, local_size, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert trainer.default_intra_threads(local_size) == expected
