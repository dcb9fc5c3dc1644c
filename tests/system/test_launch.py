"""``knl-train launch`` on real ranks (mpirun): each rank is bound to its own cores and gets the
threads and environment its preset planned (ITEX's OpenMP threads included)."""

from __future__ import annotations

import ast
import json
import os
import sys

import pytest

from knl_train.tuning.plan import cpulist
from tests.support import SCRIPTS, run_cli
from tests.support.mpi import needs_openmpi

pytestmark = pytest.mark.mpi  # knl-train launch starts real ranks


@needs_openmpi
def test_two_real_ranks_are_bound_to_distinct_cores():
    n = len(os.sched_getaffinity(0))
    if n < 2:
        pytest.skip(f"needs 2 cores to bind 2 ranks, this process may use {n}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    code = "import os; print(os.environ['OMPI_COMM_WORLD_RANK'], sorted(os.sched_getaffinity(0)))"
    proc = run_cli("launch", "-np", "2", "--", sys.executable, "-c", code, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = {}
    for line in proc.stdout.splitlines():
        rank, _, cpus = line.partition(" ")
        ranks[int(rank)] = ast.literal_eval(cpus)
    assert sorted(ranks) == [0, 1], proc.stdout
    assert [len(ranks[r]) for r in (0, 1)] == [n // 2, n // 2]
    assert not set(ranks[0]) & set(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) <= os.sched_getaffinity(0)
    if n == 2:
        assert sorted(ranks[0] + ranks[1]) == sorted(os.sched_getaffinity(0))


# ---- with a preset ------------------------------------------------------------------------------
@needs_openmpi
def test_two_real_ranks_get_exactly_the_planned_cores_threads_and_environment(tmp_path):
    """Each rank reports its own affinity, TF's thread counts and environment; all equal the plan."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores to bind 2 ranks to disjoint cores")
    p = run_cli("launch", "--preset", "generic", "-np", "2", "--",
                sys.executable, SCRIPTS / "report_rank.py", tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr
    # mpirun's own binding matched the plan: no rank had to re-bind itself.
    assert "the launcher bound" not in p.stderr
    planned = json.loads(run_cli("env", "--preset", "generic", "--ranks-per-node", "2",
                                 "--format", "json", check=True).stdout)
    got = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for want, have in zip(planned["ranks"], got):
        assert have["affinity"] == want["cpus"]
        assert have["tf_intra_op"] == want["intra_op"] and have["tf_inter_op"] == want["inter_op"]
        for k, v in want["env"].items():
            assert have["env"].get(k) == v, k
    assert set(got[0]["affinity"]).isdisjoint(got[1]["affinity"])


@needs_openmpi
def test_with_itex_openmp_threads_land_on_the_planned_cpus(tmp_path):
    """ITEX's libiomp5 reads KMP_AFFINITY: its threads are bound one per planned compute CPU."""
    from knl_train.runtime import itex
    if itex.side_version() is None and itex.site_version() is None:
        pytest.skip("ITEX is not installed (make env installs it beside the venv)")
    cpus = sorted(os.sched_getaffinity(0))
    f = tmp_path / "itex.yaml"
    f.write_text("name: itex-test\ntitle: ITEX on, all cores\n"
                 "settings: {itex: true, spare_cores: 0, kmp_blocktime: 0}\n")
    p = run_cli("launch", "--preset", f, "-np", "1", "--",
                sys.executable, SCRIPTS / "report_omp.py", tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr
    got = json.loads((tmp_path / "omp.json").read_text())
    assert got["libs"] == ["libiomp5.so"]
    assert got["env"]["KMP_AFFINITY"] == f"granularity=fine,proclist=[{cpulist(cpus)}],explicit"
    pinned = {tuple(t) for t in got["threads"] if len(t) == 1}
    assert pinned == {(c,) for c in cpus}, got["threads"]
