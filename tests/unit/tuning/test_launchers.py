"""The launcher registry (knl_train/tuning/launchers.py): every registered launcher's line for a
recorded KNL node, and the one srun class behind ``knl-train env --format srun`` and a study."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from knl_train.errors import UserError
from knl_train.studies import render, spec as study_spec
from knl_train.tuning import launchers, preset, show, snapshot
from knl_train.tuning.launchers import Request
from knl_train.tuning.plan import cpulist, plan
from tests.support import FIXTURES, write_study_spec

SNAPSHOTS = FIXTURES / "topology"


def knl4():
    """KNL 7250 in quad-flat mode, 4 ranks x 17 cores x 4 hardware threads."""
    return plan(preset.load("knl-7250"), snapshot.load(SNAPSHOTS / "knl-7250-quad-flat.json"), 4)


NODE = knl4()
EXPORTS = launchers.rank_env(NODE, "knl-7250").to_environ()
PASSED = ["KNL_TRAIN_PRESET=knl-7250", "KNL_TRAIN_RANKS_PER_NODE=4", "KNL_TRAIN_CORES_PER_RANK=17"]
MASKS = ",".join(hex(sum(1 << c for c in r.cpus)) for r in NODE.ranks)
CC = ":".join(cpulist(r.cpus) for r in NODE.ranks)
MCA = ["--mca", "odls_base_sigkill_timeout", "10", "--mca", "mpi_yield_when_idle", "1"]
ENV = shutil.which("env") or "/usr/bin/env"  # what lines that pass variables through env start with

# One node, the preset's variables on the line.
LINES = {
    "mpirun": ["mpirun", "-np", "4", "--map-by", "ppr:4:node:PE=17", "--bind-to", "core", *MCA,
               *(t for p in PASSED for t in ("-x", p))],
    "impi": ["mpiexec.hydra", "-n", "4", "-ppn", "4", "-genv", "I_MPI_PIN_DOMAIN", f"[{MASKS}]",
             *(t for p in PASSED for t in ("-genv", *p.split("=")))],
    "srun": ["srun", "--nodes=1", "--ntasks=4", "--ntasks-per-node=4", "--cpus-per-task=68",
             f"--cpu-bind=mask_cpu:{MASKS}", "--distribution=block:block", "--kill-on-bad-exit=1",
             "--export=" + ",".join(["ALL", *PASSED])],
    "aprun": ["aprun", "-n", "4", "-N", "4", "-d", "36", "-j", "2", "-cc", CC,
              *(t for p in PASSED for t in ("-e", p))],
    "ibrun": [ENV, f"I_MPI_PIN_DOMAIN=[{MASKS}]", *PASSED, "ibrun"],
    "horovodrun": [ENV, *PASSED, "horovodrun", "--gloo", "-np", "4", "-H", "localhost:4"],
}
# The same, in a job script that exported the variables first.
EXPORTED = {
    "mpirun": ["mpirun", "-np", "4", "--map-by", "ppr:4:node:PE=17", "--bind-to", "core", *MCA,
               "-x", "KNL_TRAIN_PRESET", "-x", "KNL_TRAIN_RANKS_PER_NODE", "-x",
               "KNL_TRAIN_CORES_PER_RANK", "-x", "PATH"],
    "impi": ["mpiexec.hydra", "-n", "4", "-ppn", "4"],
    "srun": [*LINES["srun"][:-1], "--export=ALL"],
    "aprun": LINES["aprun"][:11],
    "ibrun": ["ibrun"],
    "horovodrun": ["horovodrun", "--gloo", "-np", "4", "-H", "localhost:4"],
}


@pytest.fixture(params=launchers.names())
def launcher(request) -> launchers.Launcher:
    return launchers.get(request.param)


def test_the_registry_holds_every_launcher_once():
    assert launchers.names() == ("aprun", "horovodrun", "ibrun", "impi", "mpirun", "srun")
    assert set(LINES) == set(EXPORTED) == set(launchers.names())
    assert {type(launchers.get(n)).__name__ for n in launchers.names()} == {
        "OpenMpi", "Hydra", "Srun", "Aprun", "Ibrun", "HorovodrunGloo"}


def test_an_unknown_launcher_names_the_closest_and_lists_them_all():
    with pytest.raises(UserError) as e:
        launchers.get("srn")
    assert "unknown launcher 'srn' (did you mean srun?)" in str(e.value)
    assert all(n in str(e.value) for n in launchers.names())


def test_each_launchers_line_for_a_recorded_knl_node(launcher):
    assert launcher.command(Request(NODE, exports=EXPORTS)) == LINES[launcher.name]


def test_each_launchers_line_in_a_job_script_that_exported_the_variables(launcher):
    line = launcher.command(Request(NODE, exports=EXPORTS, exported=True, forward=("PATH",)))
    assert line == EXPORTED[launcher.name]
    assert not [p for p in PASSED if p in " ".join(line)]  # no value is repeated


def test_each_launcher_binds_what_the_plan_binds(launcher):
    """Every rank's CPUs reach the launcher: as masks, a CPU list, or Open MPI's core runs;
    horovodrun binds nothing, and each rank binds itself (knl-train exec)."""
    line = " ".join(launcher.command(Request(NODE, exports=EXPORTS)))
    bound = {"mpirun": "ppr:4:node:PE=17", "aprun": CC, "horovodrun": None}.get(launcher.name, MASKS)
    if bound is None:
        assert MASKS not in line and "bind" not in line
    else:
        assert bound in line
    assert launcher.binding_env(NODE) in ({}, {"I_MPI_PIN_DOMAIN": f"[{MASKS}]"})


def test_each_launcher_counts_every_nodes_ranks(launcher):
    if launcher.hostfile_option:
        request = Request(NODE, nodes=3, exports=EXPORTS, hostfile="hosts")
    else:
        request = Request(NODE, nodes=3, exports=EXPORTS)
    line = launcher.command(request)
    assert request.total_ranks == 12
    if launcher.name != "ibrun":  # ibrun takes the task count from the job
        assert "12" in line or "--ntasks=12" in line
    if launcher.hostfile_option:
        assert line[line.index(launcher.hostfile_option) + 1] == "hosts"


def test_launchers_that_take_hosts_from_the_scheduler_refuse_a_hostfile(launcher):
    if launcher.hostfile_option:
        assert launcher.hosts('"$PBS_NODEFILE"') == [launcher.hostfile_option, '"$PBS_NODEFILE"']
        return
    assert launcher.hosts('"$PBS_NODEFILE"') == []
    with pytest.raises(UserError, match="takes its hosts from the scheduler"):
        launcher.command(Request(NODE, hostfile="hosts"))


def test_bind_only_lines_without_a_preset():
    line = launchers.get("mpirun").command(Request(None, ranks=2, cores_per_rank=3))
    assert line == ["mpirun", "-np", "2", "--map-by", "slot:PE=3", "--bind-to", "core", *MCA]
    with pytest.raises(UserError, match="give a preset"):
        launchers.get("srun").command(Request(None, ranks=2))
    with pytest.raises(UserError, match="at least one rank"):
        Request(None)


def test_horovodrun_over_several_nodes_needs_a_hostfile():
    with pytest.raises(UserError, match="horovodrun over 2 nodes needs a hostfile"):
        launchers.get("horovodrun").command(Request(NODE, nodes=2))


def test_srun_options_only_when_given():
    line = launchers.get("srun").command(Request(NODE, srun_mpi="pmix", options=("--overlap",)))
    assert line[-3:] == ["--mpi=pmix", "--export=ALL", "--overlap"]


# ---- one srun line ---------------------------------------------------------------------------------
def test_env_srun_and_the_studys_srun_line_come_from_the_same_class(tmp_path, monkeypatch):
    calls = []
    original = launchers.Srun.command

    def spy(self, request):
        calls.append(type(self))
        return original(self, request)

    monkeypatch.setattr(launchers.Srun, "command", spy)
    study = study_spec.load(write_study_spec(tmp_path, site="skx-2s"))
    assert study.site.launcher == "srun"
    point = study.points[-1]
    in_script = shlex.split(render.launcher(study, point))
    printed = shlex.split(show.text(study.node, "srun", preset_ref=study.preset_ref, nodes=point.nodes,
                                    command=["train"]))
    assert calls == [launchers.Srun, launchers.Srun]
    # The same options, but the site's MPI plugin, and the values the script exported itself.
    mpi = [a for a in in_script if a.startswith("--mpi=")]
    assert mpi == ["--mpi=pmix"]
    assert [a for a in in_script if a not in mpi][:-1] == printed[:len(in_script) - 2]
    assert "--kill-on-bad-exit=1" in printed and in_script[-1] == "--export=ALL"
    assert printed[len(in_script) - 2].startswith("--export=ALL,KNL_TRAIN_PRESET=skx-8160,")
    assert printed[-4:] == ["knl-train", "exec", "--", "train"]


def test_the_tuning_library_loads_without_tensorflow_or_horovod():
    code = ("import sys, knl_train.tuning as t; t.launchers.names(); "
            "assert not {'tensorflow', 'horovod'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
