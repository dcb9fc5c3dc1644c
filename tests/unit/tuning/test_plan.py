"""Node plans (knl_train/tuning/plan.py): presets planned onto recorded node snapshots, rank by
rank (cores, threads, affinity, memory), on Xeon Phi, Xeon and small nodes."""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.tuning import preset, snapshot as snapshots
from knl_train.tuning.plan import cpulist, plan
from tests.support import FIXTURES

SNAPSHOTS = FIXTURES / "topology"


def snap(name):
    return snapshots.load(SNAPSHOTS / f"{name}.json")


def r(a, b):
    return tuple(range(a, b))


# ---- Xeon Phi 7250 ----------------------------------------------------------------------------
def test_knl_four_ranks_of_17_cores_compute_on_16_cores_times_2_hyperthreads():
    node = plan(preset.load("knl-7250"), snap("knl-7250-quad-cache"), 4)
    assert node.ranks_per_node == 4 and node.cores_per_rank == 17 and node.cpus_per_task == 68
    r0, r3 = node.ranks[0], node.ranks[3]
    # Linux numbers KNL threads core-major by thread: CPU c, c+68, c+136, c+204 share core c.
    assert r0.compute_cpus == r(0, 16) + r(68, 84)
    assert r0.spare_cpus == (16, 84, 152, 220)
    # Bound: 2 hyperthreads of 16 cores and the whole spare core; the other 2 x 16 stay idle.
    assert r0.cpus == tuple(sorted(r(0, 17) + r(68, 85) + (152, 220)))
    assert r3.compute_cpus == r(51, 67) + r(119, 135)
    assert r0.intra_op == 32 and r0.inter_op == 1 and r0.data_threads == 3
    env = r0.environ
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == "32"
    assert env["KMP_AFFINITY"] == "granularity=fine,proclist=[0-15,68-83],explicit"
    assert env["KMP_HW_SUBSET"] == "2t" and env["KMP_BLOCKTIME"] == "0"
    assert env["HOROVOD_THREAD_AFFINITY"] == "16,33,50,67"
    assert env["KNL_TRAIN_ITEX"] == "0" and env["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(128 * 1024 * 1024)
    bound = [c for rank in node.ranks for c in rank.cpus]
    assert len(bound) == len(set(bound)) == 4 * 36
    assert node.numactl == () and any("cache mode" in n for n in node.notes)


def test_knl_one_rank_keeps_64_threads_and_4_cores_for_communication_and_prefers_mcdram():
    node = plan(preset.load("knl-7250"), snap("knl-7250-quad-flat"), 1)
    (only,) = node.ranks
    assert only.compute_cpus == r(0, 64) and only.intra_op == 64 and only.inter_op == 2
    assert only.spare_cpus == tuple(sorted((64, 65, 66, 67, 132, 133, 134, 135, 200, 201, 202,
                                            203, 268, 269, 270, 271)))
    assert only.environ["KMP_HW_SUBSET"] == "1t"
    assert only.environ["HOROVOD_THREAD_AFFINITY"] == "64"
    assert node.numactl == ("numactl", "--preferred=1")


def test_itex_on_a_xeon_phi_is_refused(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(preset.load("knl-7250").to_yaml().replace("itex: false", "itex: true"))
    with pytest.raises(UserError, match="Xeon Phi.*SIGILL.*itex: false"):
        plan(preset.load(str(f)), snap("knl-7250-quad-cache"), 4)


# ---- Xeon ---------------------------------------------------------------------------------------
def test_skx_one_rank_per_socket_leaves_two_cores():
    node = plan(preset.load("skx-8160"), snap("skx-8160-2s"))
    assert node.ranks_per_node == 2 and node.cores_per_rank == 24
    r0, r1 = node.ranks
    # One hardware thread per compute core; the spare cores keep both of theirs.
    assert r0.cpus == r(0, 24) + (70, 71)
    assert r1.cpus == r(24, 48) + (94, 95)
    assert r0.compute_cpus == r(0, 22) and r1.compute_cpus == r(24, 46)
    assert r0.intra_op == 22 and r0.environ["KMP_HW_SUBSET"] == "1t"
    assert r0.environ["HOROVOD_THREAD_AFFINITY"] == "22,46"
    assert not node.warnings


def test_skx_two_ranks_per_socket_leave_one_core_each():
    node = plan(preset.load("skx-8160"), snap("skx-8160-2s"), 4)
    assert [rk.intra_op for rk in node.ranks] == [11] * 4
    assert [rk.compute_cpus[0] for rk in node.ranks] == [0, 12, 24, 36]
    assert node.ranks[0].data_threads == 1


def test_three_ranks_on_two_sockets_warn_about_the_rank_that_crosses():
    node = plan(preset.load("skx-8160"), snap("skx-8160-2s"), 3)
    assert node.cores_per_rank == 16
    assert any("local rank 1 spans sockets [0, 1]" in w for w in node.warnings)


@pytest.mark.parametrize("name, snapshot, intra, inter, onednn", [
    ("icx-8380", "icx-8380-2s", 38, 2, "1"),
    ("spr-8480", "spr-8480-2s", 55, 2, "1"),
    ("epyc", "epyc-7763-2s", 62, 1, "0"),
])
def test_one_rank_per_socket_on_newer_cpus(name, snapshot, intra, inter, onednn):
    node = plan(preset.load(name), snap(snapshot))
    assert node.ranks_per_node == 2
    assert [rk.intra_op for rk in node.ranks] == [intra, intra]
    assert node.ranks[0].inter_op == inter
    assert node.ranks[0].environ["TF_ENABLE_ONEDNN_OPTS"] == onednn
    assert set(node.ranks[0].cpus).isdisjoint(node.ranks[1].cpus)


def test_a_preset_for_another_cpu_warns_naming_both():
    node = plan(preset.load("knl-7250"), snap("skx-8160-2s"), 2)
    (w,) = node.warnings
    assert "preset knl-7250" in w and "Platinum 8160" in w and "detected preset: skx-8160" in w


# ---- small nodes, oversubscription ------------------------------------------------------------
def test_two_ranks_on_this_two_core_machine_get_a_core_each_and_no_spare():
    node = plan(preset.load("spr-8480"), snap("this-machine"), 2)
    assert [rk.cpus for rk in node.ranks] == [(0,), (1,)]
    assert [rk.intra_op for rk in node.ranks] == [1, 1]
    assert "HOROVOD_THREAD_AFFINITY" not in node.ranks[0].environ
    assert "KMP_HW_SUBSET" not in node.ranks[0].environ


def test_more_ranks_than_cores_is_an_error_unless_oversubscribed():
    with pytest.raises(UserError, match=r"4 ranks x 1 cores need 4 cores, but this node lets us "
                                        r"use 2 .*--oversubscribe"):
        plan(preset.load("generic"), snap("this-machine"), 4)
    node = plan(preset.load("generic"), snap("this-machine"), 4, oversubscribe=True)
    assert node.oversubscribed and [rk.cpus for rk in node.ranks] == [(0,), (1,), (0,), (1,)]
    assert "KMP_AFFINITY" not in node.ranks[0].environ


def test_a_preset_for_another_cpu_with_more_ranks_than_cores_points_at_the_nominal_topology():
    # knl-train env --preset knl-7250 --ranks-per-node 4 on this 2-core node (issue 16, Why 9).
    with pytest.raises(UserError) as e:
        plan(preset.load("knl-7250"), snap("this-machine"), 4)
    msg = str(e.value)
    assert msg.startswith("4 ranks x 1 cores need 4 cores, but this node lets us use 2 (CPUs 0-1): "
                          "preset knl-7250 is written for Intel(R) Xeon Phi(TM) CPU 7250")
    assert "(68 cores)" in msg and "--topology nominal" in msg
    assert "knl-train env --preset knl-7250 --topology nominal" in msg
    assert "--oversubscribe" not in msg  # sharing cores is not what such a user wants


def test_a_preset_for_this_cpu_with_more_ranks_than_cores_still_offers_oversubscribe():
    with pytest.raises(UserError) as e:
        plan(preset.load("spr-8480"), snap("this-machine"), 4)
    assert "--oversubscribe" in str(e.value) and "nominal" not in str(e.value)


def test_threads_per_rank_over_the_cores_is_an_error():
    with pytest.raises(UserError, match="2 ranks x 2 cores need 4 cores"):
        plan(preset.load("generic"), snap("this-machine"), 2, cores_per_rank=2)
    with pytest.raises(UserError, match="--threads-per-rank must be >= 1 .*got -1"):
        plan(preset.load("generic"), snap("this-machine"), 2, cores_per_rank=-1)


def test_omp_affinity_style_sets_places_instead_of_kmp_affinity(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: p\ntitle: t\nsettings: {affinity: omp, spare_cores: 2}\n")
    node = plan(preset.load(str(f)), snap("skx-8160-2s"), 2)
    env = node.ranks[1].environ
    assert "KMP_AFFINITY" not in env and env["OMP_PROC_BIND"] == "close"
    assert env["OMP_PLACES"] == ",".join(f"{{{c}}}" for c in range(24, 46))


def test_cpulist_keeps_order_and_folds_runs():
    assert cpulist((0, 1, 2, 68, 69, 5)) == "0-2,68-69,5"
    assert cpulist(()) == ""
