"""Applying a preset per rank (runtime/bootstrap.py), ``knl-train env`` (tuning/show.py), and a real 2-rank check."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from conftest import HELPERS, run_cli
from knl_train.runtime import bootstrap, rankenv
from knl_train.errors import UserError
from knl_train.tuning import launch, preset, show, snapshot, topology
from knl_train.tuning.launch import LaunchPlan
from knl_train.tuning.plan import cpulist, plan

SNAPSHOTS = Path(__file__).parent / "fixtures" / "topology"
MPIRUN = shutil.which("mpirun")


def snap(name):
    return snapshot.load(SNAPSHOTS / f"{name}.json")


def knl4():
    return plan(preset.load("knl-7250"), snap("knl-7250-quad-flat"), 4)


# ---- local rank --------------------------------------------------------------------------------
@pytest.mark.parametrize("var", rankenv.LOCAL_RANK_VARS)
def test_local_rank_from_each_launcher(var):
    assert rankenv.local_rank(4, {var: "3"}) == 3


def test_an_mpi_launchers_local_rank_wins_over_slurms():
    # Hydra and horovodrun inside a Slurm job start per-node proxies with srun: SLURM_LOCALID=0.
    assert rankenv.local_rank(4, {"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "3"}) == 3
    assert rankenv.local_rank(4, {"SLURM_LOCALID": "0", "HOROVOD_LOCAL_RANK": "2"}) == 2
    assert rankenv.local_rank(4, {"SLURM_LOCALID": "1"}) == 1


def test_local_rank_under_aprun_and_without_a_launcher():
    assert rankenv.local_rank(4, {"ALPS_APP_PE": "6"}) == 2
    assert rankenv.local_rank(1, {}) == 0
    with pytest.raises(UserError, match="cannot tell this rank's local rank.*SLURM_LOCALID"):
        rankenv.local_rank(2, {})


# ---- launcher lines ----------------------------------------------------------------------------
def test_sh_exports_one_ranks_settings():
    text = show.text(knl4(), "sh", preset_ref="knl-7250", rank=1)
    assert "# local rank 1 of 4 per node: CPUs 17-33,85-101,169,237" in text
    assert "export KMP_AFFINITY='granularity=fine,proclist=[17-32,85-100],explicit'" in text
    assert "export OMP_NUM_THREADS=32" in text and "export HOROVOD_THREAD_AFFINITY=16,33,50,67" in text
    assert "# memory: run the command under: numactl --preferred=1" in text


def test_mpirun_line_maps_ppr_with_pe_and_passes_only_the_preset():
    line = show.text(knl4(), "mpirun", preset_ref="knl-7250", nodes=8, command=["knl-train", "train"])
    args = shlex.split(line)
    assert args[:7] == ["mpirun", "-np", "32", "--map-by", "ppr:4:node:PE=17", "--bind-to", "core"]
    assert "KNL_TRAIN_PRESET=knl-7250" in args and "KNL_TRAIN_RANKS_PER_NODE=4" in args
    assert "KNL_TRAIN_CORES_PER_RANK=17" in args
    # The same Open MPI settings as knl-train launch: yield while waiting, a SIGTERM grace.
    assert "mpi_yield_when_idle" in args and "odls_base_sigkill_timeout" in args
    assert args[-5:] == ["knl-train", "exec", "--", "knl-train", "train"]


def test_srun_line_sets_cpus_per_task_and_binds_each_rank_to_its_mask():
    args = shlex.split(show.text(knl4(), "srun", preset_ref="knl-7250", nodes=2))
    assert "--ntasks-per-node=4" in args and "--ntasks=8" in args
    assert "--cpus-per-task=68" in args  # 17 cores x 4 hardware threads
    (bind,) = [a for a in args if a.startswith("--cpu-bind=")]
    masks = bind.split(":", 1)[1].split(",")
    assert len(masks) == 4
    assert int(masks[0], 16) == sum(1 << c for c in knl4().ranks[0].cpus)
    assert ("--export=ALL,KNL_TRAIN_PRESET=knl-7250,KNL_TRAIN_RANKS_PER_NODE=4,"
            "KNL_TRAIN_CORES_PER_RANK=17") in args


def test_aprun_line_lists_each_ranks_cpus():
    args = shlex.split(show.text(knl4(), "aprun", preset_ref="knl-7250", nodes=2))
    # 32 compute threads (16 cores x 2, ALCF's -j 2) and the spare core's 4 hardware threads.
    assert args[:9] == ["aprun", "-n", "8", "-N", "4", "-d", "36", "-j", "2"]
    cc = args[args.index("-cc") + 1].split(":")
    assert cc[0] == "0-16,68-84,152,220" and len(cc) == 4
    assert "KNL_TRAIN_PRESET=knl-7250" in args


def test_intel_mpi_line_pins_domains_by_mask():
    args = shlex.split(show.text(knl4(), "impi", preset_ref="knl-7250", nodes=2))
    assert args[:5] == ["mpiexec.hydra", "-n", "8", "-ppn", "4"]
    domains = args[args.index("I_MPI_PIN_DOMAIN") + 1]
    masks = [int(m, 16) for m in domains.strip("[]").split(",")]
    assert masks == [sum(1 << c for c in rank.cpus) for rank in knl4().ranks]


def test_json_has_every_rank():
    data = json.loads(show.text(knl4(), "json", preset_ref="knl-7250"))
    assert [r["local_rank"] for r in data["ranks"]] == [0, 1, 2, 3]
    assert data["ranks"][2]["env"]["TF_NUM_INTRAOP_THREADS"] == "32"
    assert data["numactl"] == ["numactl", "--preferred=1"]


def test_a_local_rank_outside_the_plan_is_an_error():
    with pytest.raises(UserError, match="--local-rank 4 is out of range.*0-3"):
        show.text(knl4(), "sh", preset_ref="knl-7250", rank=4)


# ---- knl-train launch --preset ------------------------------------------------------------------
needs_openmpi = pytest.mark.skipif(MPIRUN is None or launch.mpi_flavour(MPIRUN) != "openmpi",
                                   reason="these lines are Open MPI's")


@needs_openmpi
def test_launch_with_a_preset_binds_ppr_and_runs_the_exec_wrapper():
    line = launch.argv(LaunchPlan(np=2, command=("python", "t.py"), preset="generic"),
                       is_root=False, environ={})
    assert line[line.index("--map-by") + 1] == "ppr:2:node:PE=1"
    assert line[line.index("--bind-to") + 1] == "core"
    assert "KNL_TRAIN_PRESET=generic" in line and "KNL_TRAIN_RANKS_PER_NODE=2" in line
    assert line[-4:] == ["exec", "--", "python", "t.py"]
    assert "horovodrun" not in " ".join(line)


@needs_openmpi
def test_launch_without_a_preset_only_binds():
    line = launch.argv(LaunchPlan(np=2, command=("python", "t.py"), preset=None),
                       is_root=False, environ={})
    assert line[line.index("--map-by") + 1] == "slot:PE=1"
    assert not any(a.startswith("KNL_TRAIN_PRESET") for a in line) and "exec" not in line


@needs_openmpi
def test_launch_passes_a_preset_file_by_absolute_path(tmp_path, monkeypatch):
    f = tmp_path / "tuned.yaml"
    f.write_text("name: tuned\ntitle: t\n")
    monkeypatch.chdir(tmp_path)
    line = launch.argv(LaunchPlan(np=1, command=("x",), preset="tuned.yaml"), is_root=False, environ={})
    assert f"KNL_TRAIN_PRESET={f}" in line


def test_launch_errors_are_one_line():
    p = run_cli("launch", "-np", "2", "--preset", "knl-7520", "--dry-run", "--", "true")
    assert p.returncode == 2 and "unknown preset 'knl-7520'" in p.stderr and "Traceback" not in p.stderr
    cores = len(os.sched_getaffinity(0))
    p = run_cli("launch", "-np", str(cores + 1), "--dry-run", "--", "true")
    assert p.returncode == 2 and "--oversubscribe" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("env", "--preset", "knl-7250", "--ranks-per-node", "2")
    assert p.returncode == 0 and "# warning: preset knl-7250" in p.stdout


def test_env_plans_a_node_type_we_are_not_on():
    p = run_cli("env", "--preset", "knl-7250", "--topology", "nominal", "--format", "srun",
                "--nodes", "2048", check=True)
    assert "--ntasks=8192" in p.stdout and "--cpus-per-task=68" in p.stdout
    assert "warning" not in p.stderr and "note: MCDRAM is in cache mode" in p.stderr
    p = run_cli("env", "--preset", "knl-7250", "--topology", str(SNAPSHOTS / "skx-8160-2s.json"),
                "--format", "srun", check=True)
    assert "knl-train: warning: preset knl-7250" in p.stderr  # launcher formats warn on stderr
    p = run_cli("env", "--preset", "skx-8160", "--topology", str(SNAPSHOTS / "skx-8160-2s.json"),
                "--format", "mpirun", check=True)
    assert "ppr:2:node:PE=24" in p.stdout


# ---- applying in the rank ------------------------------------------------------------------------
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


# ---- the real thing ------------------------------------------------------------------------------
@needs_openmpi
def test_two_real_ranks_get_exactly_the_planned_cores_threads_and_environment(tmp_path):
    """Each rank reports its own affinity, TF's thread counts and environment; all equal the plan."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores to bind 2 ranks to disjoint cores")
    p = run_cli("launch", "--preset", "generic", "-np", "2", "--",
                sys.executable, HELPERS / "report_rank.py", tmp_path, timeout=240)
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
                sys.executable, HELPERS / "report_omp.py", tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr
    got = json.loads((tmp_path / "omp.json").read_text())
    assert got["libs"] == ["libiomp5.so"]
    assert got["env"]["KMP_AFFINITY"] == f"granularity=fine,proclist=[{cpulist(cpus)}],explicit"
    pinned = {tuple(t) for t in got["threads"] if len(t) == 1}
    assert pinned == {(c,) for c in cpus}, got["threads"]


# ---- the commands ----------------------------------------------------------------------------------
def test_topology_command_describes_this_node_and_records_a_snapshot(tmp_path):
    p = run_cli("topology", check=True)
    live = topology.detect()
    assert p.stdout.splitlines()[0] == live.describe()
    assert f"preset: {preset.detect(live).name}" in p.stdout
    run_cli("topology", "--record", tmp_path / "me.json", "--name", "me", check=True)
    again = snapshot.load(tmp_path / "me.json")
    assert again.cores() == live.cores() and again.flags == live.flags


def test_env_lists_the_presets():
    p = run_cli("env", "--list", check=True)
    assert [line.split()[0] for line in p.stdout.splitlines()] == list(preset.names())


def test_tune_is_wired_and_refuses_a_bad_option():
    p = run_cli("tune", "--precision", "fp16", "--dry-run")
    assert p.returncode == 2 and "fp16" in p.stderr and "Traceback" not in p.stderr
