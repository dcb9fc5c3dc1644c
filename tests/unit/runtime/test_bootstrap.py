"""Applying a preset in the rank (knl_train/runtime/bootstrap.py): the environment it sets, what
it drops, and binding the rank when the launcher did not."""

from __future__ import annotations

import os

from knl_train.runtime import bootstrap
from knl_train.tuning import snapshot, topology
from tests.support import FIXTURES

SNAPSHOTS = FIXTURES / "topology"


def snap(name):
    return snapshot.load(SNAPSHOTS / f"{name}.json")


def test_apply_sets_the_environment_and_notes_what_it_overrode(monkeypatch, capsys):
    monkeypatch.setattr(topology, "detect", lambda root="/": snap("skx-8160-2s"))
    bound = {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: bound.setdefault("cpus", tuple(cpus)))
    environ = {"KNL_TRAIN_PRESET": "skx-8160", "KNL_TRAIN_RANKS_PER_NODE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMP_NUM_THREADS": "48"}
    node, rank = bootstrap.apply(environ)
    assert environ["OMP_NUM_THREADS"] == "22" and environ["KNL_TRAIN_APPLIED"] == "1"
    assert bound["cpus"] == rank.cpus  # the launcher did not bind: the rank binds itself
    assert "overrides OMP_NUM_THREADS=48 (now 22)" in capsys.readouterr().err
    assert bootstrap.apply(environ) is None  # once


def test_apply_drops_inherited_threading_variables_the_plan_does_not_set(monkeypatch):
    monkeypatch.setattr(topology, "detect", lambda root="/": snap("this-machine"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: None)
    environ = {"KNL_TRAIN_PRESET": "generic", "KNL_TRAIN_RANKS_PER_NODE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": "1", "HOROVOD_THREAD_AFFINITY": "5,6",
               "OMP_PLACES": "{0}", "GOMP_CPU_AFFINITY": "0-1"}
    bootstrap.apply(environ)
    assert environ["KMP_AFFINITY"] == "granularity=fine,proclist=[1],explicit"
    for name in ("HOROVOD_THREAD_AFFINITY", "OMP_PLACES", "GOMP_CPU_AFFINITY"):
        assert name not in environ


def test_apply_without_a_preset_does_nothing():
    environ = {"OMP_NUM_THREADS": "3"}
    assert bootstrap.apply(environ) is None and environ == {"OMP_NUM_THREADS": "3"}
