"""Node snapshots (knl_train/tuning/snapshot.py): a recording keeps only what detection reads,
and a snapshot without /proc/cpuinfo is named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from knl_train.errors import UserError
from knl_train.tuning import snapshot, topology as topo
from knl_train.tuning.topology import Topology
from tests.support import FIXTURES

SNAPSHOTS = FIXTURES / "topology"


def snap(name: str) -> dict:
    return json.loads((SNAPSHOTS / f"{name}.json").read_text(encoding="utf-8"))


def load(name: str) -> Topology:
    return snapshot.load(SNAPSHOTS / f"{name}.json")


def without_source(t: Topology) -> Topology:
    return dataclasses.replace(t, source="")


def test_record_keeps_only_what_detect_reads(tmp_path):
    s = snap("skx-8160-2s")
    for rel, text in s["files"].items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    first = s["files"]["proc/cpuinfo"]
    (tmp_path / "proc/cpuinfo").write_text(first + "\n" + first.replace("processor\t: 0", "processor\t: 1"))
    (tmp_path / "proc/self/status").write_text("Name:\tpython\nUid:\t1000\n" + s["files"]["proc/self/status"])
    (tmp_path / "proc/self/cgroup").write_text("4:memory:/user/secret\n" + s["files"]["proc/self/cgroup"])
    (tmp_path / "unrelated.txt").write_text("x")
    rec = snapshot.record(str(tmp_path), name="copy")
    assert rec["name"] == "copy" and rec["lscpu"] is None   # lscpu only describes the live root
    assert rec["files"] == s["files"]
    assert without_source(snapshot.to_topology(rec)) == without_source(topo.detect(str(tmp_path)))
    assert without_source(topo.detect(str(tmp_path))) == without_source(load("skx-8160-2s"))


def test_missing_cpuinfo_names_the_file(tmp_path):
    s = snap("skx-8160-2s")
    del s["files"]["proc/cpuinfo"]
    with pytest.raises(UserError, match=r"proc/cpuinfo in snapshot 'skx-8160-2s'.*--record FILE"):
        snapshot.to_topology(s)
    with pytest.raises(UserError, match=rf"{tmp_path}/proc/cpuinfo"):
        topo.detect(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        snapshot.load(tmp_path / "nope.json")
    with pytest.raises(UserError, match="not a topology snapshot"):
        snapshot.to_topology({"name": "x"})
