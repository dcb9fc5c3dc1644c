"""Topology detection (knl_train/tuning/topology.py) over recorded node snapshots
(tests/fixtures/topology): sockets, cores, NUMA and MCDRAM, cgroups, lscpu, the live machine."""

from __future__ import annotations

import json
import os

import pytest

from knl_train.errors import UserError
from knl_train.tuning import snapshot, topology as topo
from knl_train.tuning.topology import Topology
from tests.support import FIXTURES

SNAPSHOTS = FIXTURES / "topology"
KNL_FLAGS = ("avx2", "avx512f", "avx512er", "avx512pf")
SPR_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")


def snap(name: str) -> dict:
    return json.loads((SNAPSHOTS / f"{name}.json").read_text(encoding="utf-8"))


def load(name: str) -> Topology:
    return snapshot.load(SNAPSHOTS / f"{name}.json")


# name: sockets, cores/socket, threads/core, CPUs, [(node, CPUs, MB)], mcdram, isa, is_knl, core of CPU 0
EXPECTED = {
    "knl-7250-quad-cache": (1, 68, 4, 272, [(0, 272, 96000)], (), KNL_FLAGS, True, (0, 68, 136, 204)),
    "knl-7250-quad-flat": (1, 68, 4, 272, [(0, 272, 96000), (1, 0, 16128)], (1,), KNL_FLAGS, True,
                           (0, 68, 136, 204)),
    "skx-8160-2s": (2, 24, 2, 96, [(0, 48, 95746), (1, 48, 96258)], (), ("avx2", "avx512f"), False, (0, 48)),
    "icx-8380-2s": (2, 40, 2, 160, [(0, 80, 128540), (1, 80, 128796)], (), ("avx2", "avx512f", "avx512_vnni"),
                    False, (0, 80)),
    "spr-8480-2s": (2, 56, 2, 224, [(0, 112, 128412), (1, 112, 128800)], (), SPR_ISA, False, (0, 112)),
    "epyc-7763-2s": (2, 64, 2, 256, [(0, 128, 257658), (1, 128, 257658)], (), ("avx2",), False, (0, 128)),
    "epyc-7763-2s-container": (2, 64, 2, 256, [(0, 256, 515316)], (), ("avx2",), False, (0, 128)),
    "this-machine": (1, 2, 1, 2, [(0, 2, 11482)], (), SPR_ISA, False, (0,)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snapshot_values(name):
    sockets, cps, tpc, ncpus, nodes, mcdram, isa, knl, core0 = EXPECTED[name]
    t = load(name)
    assert (t.sockets, t.cores_per_socket, t.threads_per_core, len(t.cpus)) == (sockets, cps, tpc, ncpus)
    assert [(n.id, len(n.cpus), n.memory_mb) for n in t.nodes] == nodes
    assert t.mcdram_nodes == mcdram
    assert t.isa == isa
    assert t.is_knl is knl
    assert len(t.cores()) == sockets * cps
    assert t.cores()[0] == core0
    assert t.allowed == t.affinity == frozenset(range(ncpus))
    assert t.source == name
    assert [c.id for c in t.cpus] == list(range(ncpus))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_core_lists_its_hw_siblings(name):
    t = load(name)
    key = {c.id: (c.socket, c.core) for c in t.cpus}
    cores = t.cores()
    assert sorted(cpu for core in cores for cpu in core) == sorted(key)
    for core in cores:
        assert len(core) == t.threads_per_core
        assert list(core) == sorted(core)
        assert len({key[cpu] for cpu in core}) == 1
    # logical order: by (socket, core_id)
    assert [key[core[0]] for core in cores] == sorted(key[core[0]] for core in cores)


def test_identity_from_cpuinfo():
    knl = load("knl-7250-quad-flat")
    assert (knl.vendor, knl.model_name, knl.family, knl.model) == (
        "GenuineIntel", "Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz", 6, 87)
    assert {"avx512f", "avx512pf", "avx512er", "avx512cd"} <= knl.flags and "avx512bw" not in knl.flags
    spr = load("spr-8480-2s")
    assert (spr.model_name, spr.family, spr.model) == ("Intel(R) Xeon(R) Platinum 8480+", 6, 143)
    assert {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16"} <= spr.flags
    icx = load("icx-8380-2s")
    assert (icx.model, "avx512_bitalg" in icx.flags, "amx_tile" in icx.flags) == (106, True, False)
    epyc = load("epyc-7763-2s")
    assert (epyc.vendor, epyc.family, epyc.model) == ("AuthenticAMD", 25, 1)
    assert "avx2" in epyc.flags and not any(f.startswith("avx512") for f in epyc.flags)
    assert epyc.hypervisor == "" and load("skx-8160-2s").hypervisor == ""


def test_sparse_core_ids_and_sockets():
    skx = load("skx-8160-2s")
    socket0 = sorted(c.core for c in skx.cpus if c.socket == 0 and c.id < 48)
    assert socket0 == [*range(0, 6), *range(8, 14), *range(16, 22), *range(24, 30)]
    assert skx.socket_of(0) == 0 and skx.socket_of(24) == 1 and skx.socket_of(71) == 0
    assert skx.cores()[23] == (23, 71) and skx.cores()[24] == (24, 72)
    assert [c.node for c in skx.cpus if c.id in (0, 24, 48, 72)] == [0, 1, 0, 1]
    knl = load("knl-7250-quad-cache")
    assert max(c.core for c in knl.cpus) == 75 and len({c.core for c in knl.cpus}) == 68
    with pytest.raises(UserError, match="CPU 96 is not online"):
        skx.socket_of(96)


def test_knl_flat_mcdram_node_and_describe():
    t = load("knl-7250-quad-flat")
    assert t.nodes[1].cpus == () and t.nodes[1].memory_mb == 16128
    assert all(c.node == 0 for c in t.cpus)
    assert t.describe() == ("Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz: 1 socket x 68 cores x 4 threads, "
                            "2 NUMA nodes (1 without CPUs: 16 GB MCDRAM), ISA avx2 avx512f avx512er avx512pf")
    assert load("knl-7250-quad-cache").describe().endswith("1 NUMA node, ISA avx2 avx512f avx512er avx512pf")


def test_cgroup_v2_cpuset_narrows_allowed_not_affinity():
    t = load("skx-8160-2s-slurm-half")
    socket0 = frozenset([*range(0, 24), *range(48, 72)])
    assert len(t.cpus) == 96
    assert t.allowed == socket0       # from the job's cpuset, found by walking up from task_0
    assert t.affinity == frozenset([*range(0, 6), *range(48, 54)])
    assert len(t.cores()) == 24 and {t.socket_of(core[0]) for core in t.cores()} == {0}
    assert t.cores(t.affinity) == tuple((i, i + 48) for i in range(6))
    assert len(t.cores(range(96))) == 48
    assert "job may use 48 of 96 CPUs (0-23,48-71)" in t.describe()


def test_cgroup_v1_and_missing_cgroup_files():
    s = snap("knl-7250-quad-cache")
    assert s["files"]["proc/self/cgroup"] == "11:cpuset:/\n"
    s["files"]["sys/fs/cgroup/cpuset/cpuset.cpus"] = "0-67\n"
    assert snapshot.to_topology(s).allowed == frozenset(range(68))
    del s["files"]["sys/fs/cgroup/cpuset/cpuset.cpus"]
    assert len(snapshot.to_topology(s).allowed) == 272   # no cpuset file: all online CPUs


def test_lscpu_fallback_without_sysfs_topology_or_numa():
    s = snap("epyc-7763-2s-container")
    assert not any("/topology/" in p or "system/node" in p for p in s["files"])
    t = snapshot.to_topology(s)
    full = load("epyc-7763-2s")
    assert (t.sockets, t.cores_per_socket, t.threads_per_core) == (2, 64, 2)
    assert t.cores() == full.cores()
    # lscpu's CORE column is its machine-wide core number, not sysfs core_id
    assert [(c.socket, c.core) for c in t.cpus if c.id in (63, 64, 191, 192)] == [(0, 63), (1, 64), (0, 63), (1, 64)]
    assert t.nodes == (topo.NumaNode(0, tuple(range(256)), 515316),)   # one node, proc/meminfo MemTotal
    s["lscpu"] = None
    with pytest.raises(UserError, match="cpu0/topology/physical_package_id"):
        snapshot.to_topology(s)


def test_hypervisor_from_lscpu_or_flag():
    t = load("this-machine")
    assert (t.hypervisor, t.model, "hypervisor" in t.flags) == ("KVM", 167, True)
    assert "hypervisor KVM" in t.describe()
    s = snap("this-machine")
    s["lscpu"] = None
    assert snapshot.to_topology(s).hypervisor == "unknown"


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["skx-8160-2s-slurm-half"])
def test_to_dict_round_trip(name):
    t = load(name)
    d = json.loads(json.dumps(t.to_dict()))
    assert Topology.from_dict(d) == t
    assert Topology.from_dict(t.to_dict()) == t  # straight from to_dict(), sets and tuples as they are
    assert (d["sockets"], d["isa"], d["allowed"][:2]) == (t.sockets, list(t.isa), sorted(t.allowed)[:2])


def test_synthetic_matches_real_knl_flat_and_skx():
    knl = load("knl-7250-quad-flat")
    nominal = topo.synthetic(knl.model_name, knl.vendor, knl.flags, sockets=1, cores_per_socket=68,
                             threads_per_core=4, memory_gb=96, mcdram_gb=16, memory_mode="flat", model=87)
    skx = load("skx-8160-2s")
    nominal_skx = topo.synthetic(skx.model_name, skx.vendor, " ".join(skx.flags), sockets=2,
                                 cores_per_socket=24, threads_per_core=2, memory_gb=192, model=85)
    for real, nom in ((knl, nominal), (skx, nominal_skx)):
        assert (nom.sockets, nom.cores_per_socket, nom.threads_per_core) == (
            real.sockets, real.cores_per_socket, real.threads_per_core)
        assert nom.cores() == real.cores()
        assert nom.mcdram_nodes == real.mcdram_nodes
        assert [n.cpus for n in nom.nodes] == [n.cpus for n in real.nodes]
        assert nom.isa == real.isa and nom.allowed == nom.affinity == real.allowed
    assert [n.memory_mb for n in nominal.nodes] == [98304, 16384]
    assert nominal.describe() == knl.describe()


def test_synthetic_numa_split_and_errors():
    t = topo.synthetic("x", "GenuineIntel", "avx2", sockets=2, cores_per_socket=4, threads_per_core=2,
                       memory_gb=64, numa_per_socket=2)
    assert [n.cpus for n in t.nodes] == [(0, 1, 8, 9), (2, 3, 10, 11), (4, 5, 12, 13), (6, 7, 14, 15)]
    assert [n.memory_mb for n in t.nodes] == [16384] * 4 and t.mcdram_nodes == ()
    with pytest.raises(UserError, match="memory_mode"):
        topo.synthetic("x", "v", "", 1, 4, 1, memory_mode="hybrid")
    with pytest.raises(UserError, match="mcdram_gb"):
        topo.synthetic("x", "v", "", 1, 4, 1, memory_mode="flat")


def test_detect_live_machine():
    t = topo.detect("/")
    assert t.affinity == frozenset(os.sched_getaffinity(0))
    assert len(t.affinity) == len(os.sched_getaffinity(0))
    assert len(t.cpus) == os.cpu_count()
    assert t.affinity <= t.allowed <= {c.id for c in t.cpus}
    assert len(t.cores()) * t.threads_per_core >= len(t.allowed)
    assert t.vendor and t.model_name and t.flags
    assert sum(len(n.cpus) for n in t.nodes) == len(t.cpus)


def test_cpulist_syntax():
    assert topo.parse_cpulist("0-3,8,10-11\n") == frozenset([0, 1, 2, 3, 8, 10, 11])
    assert topo.parse_cpulist("\n") == frozenset()
    assert topo.format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
