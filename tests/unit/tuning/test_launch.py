"""``knl-train launch`` lines (knl_train/tuning/launch.py): Open MPI, Hydra and gloo, binding,
oversubscription, the environment forwarded, with and without a preset. The real 2-rank runs are
in tests/system/test_launch.py."""

from __future__ import annotations

import os

import pytest

from knl_train.errors import UserError
from knl_train.tuning import launch, launchers, snapshot, topology
from knl_train.tuning.launch import LaunchPlan
from tests.support import FIXTURES
from tests.support.mpi import MPIRUN, needs_openmpi

CMD = ("python", "train.py")


def _x_names(line):
    return [line[i + 1] for i, a in enumerate(line) if a == "-x"]


def _after(line, flag):
    return line[line.index(flag) + 1]


@pytest.fixture
def cores(monkeypatch):
    """Pretend this host lets us use ``n`` cores."""
    def _set(n):
        monkeypatch.setattr(launch, "available_cores", lambda: n)
    return _set


# ---- Open MPI: running as root -------------------------------------------------------------------
@needs_openmpi
def test_root_gets_allow_run_as_root_on_the_command_line():
    line = launch.argv(LaunchPlan(np=1, command=CMD, preset=None), is_root=True, environ={})
    assert line[0] == MPIRUN
    assert line[1:3] == ["-np", "1"]
    assert "--allow-run-as-root" in line
    assert line[-2:] == list(CMD)


@needs_openmpi
def test_ranks_get_a_grace_period_when_mpirun_is_sent_sigterm():
    line = launch.argv(LaunchPlan(np=2, command=CMD, preset=None), is_root=False, environ={})
    i = line.index("odls_base_sigkill_timeout")
    assert line[i - 1] == "--mca" and line[i + 1] == str(launchers.SIGKILL_GRACE_SECONDS) == "10"


@needs_openmpi
def test_mpi_yields_the_core_while_it_waits():
    line = launch.argv(LaunchPlan(np=2, command=CMD, preset=None), is_root=False, environ={})
    i = line.index("mpi_yield_when_idle")
    assert line[i - 1:i + 2] == ["--mca", "mpi_yield_when_idle", "1"]


@needs_openmpi
def test_non_root_does_not_get_allow_run_as_root():
    line = launch.argv(LaunchPlan(np=1, command=CMD, preset=None), is_root=False, environ={})
    assert "--allow-run-as-root" not in line
    assert line[:3] == [MPIRUN, "-np", "1"] and line[-2:] == list(CMD)


@needs_openmpi
def test_default_is_root_follows_the_effective_uid():
    line = launch.argv(LaunchPlan(np=1, command=CMD, preset=None), environ={})
    assert ("--allow-run-as-root" in line) == (os.geteuid() == 0)


@needs_openmpi
@pytest.mark.parametrize("is_root", [True, False])
def test_allow_run_as_root_never_goes_through_the_environment(is_root):
    environ = {"PATH": "/usr/bin", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    line = launch.argv(LaunchPlan(np=1, command=CMD, preset=None), is_root=is_root, environ=environ)
    assert not [a for a in line if "OMPI_ALLOW_RUN_AS_ROOT" in a]
    assert _x_names(line) == ["PATH"]


# ---- Open MPI: binding and oversubscription -----------------------------------------------------
@needs_openmpi
def test_binds_each_rank_to_its_share_of_the_cores(cores):
    cores(8)
    line = launch.argv(LaunchPlan(np=2, command=CMD, preset=None), is_root=False, environ={})
    assert _after(line, "--map-by") == "slot:PE=4"
    assert _after(line, "--bind-to") == "core"
    assert "--oversubscribe" not in line


@needs_openmpi
def test_explicit_threads_per_rank(cores):
    cores(8)
    line = launch.argv(LaunchPlan(np=3, command=CMD, preset=None, threads_per_rank=2), is_root=False, environ={})
    assert _after(line, "--map-by") == "slot:PE=2" and _after(line, "--bind-to") == "core"


@needs_openmpi
def test_real_core_count_one_rank_gets_all_cores():
    n = len(os.sched_getaffinity(0))
    line = launch.argv(LaunchPlan(np=1, command=CMD, preset=None), is_root=False, environ={})
    assert _after(line, "--map-by") == f"slot:PE={n}"


@pytest.mark.parametrize("np_, threads", [(3, 0), (2, 2), (1, 3)])
def test_more_ranks_x_threads_than_cores_is_a_user_error(cores, np_, threads):
    cores(2)
    plan = LaunchPlan(np=np_, command=CMD, preset=None, threads_per_rank=threads)
    with pytest.raises(UserError) as e:
        launch.argv(plan, is_root=False, environ={})
    msg = str(e.value)
    assert "--oversubscribe" in msg
    assert f"need {np_ * (threads or 1)} cores" in msg and "may use 2" in msg


def test_real_core_count_overflow_is_a_user_error():
    n = len(os.sched_getaffinity(0))
    with pytest.raises(UserError, match="--oversubscribe"):
        launch.argv(LaunchPlan(np=n + 1, command=CMD, preset=None), is_root=False, environ={})


@needs_openmpi
def test_oversubscribe_shares_cores_and_binds_nothing(cores):
    cores(2)
    line = launch.argv(LaunchPlan(np=5, command=CMD, preset=None, oversubscribe=True), is_root=False, environ={})
    assert "--oversubscribe" in line
    assert _after(line, "--bind-to") == "none"
    assert "--map-by" not in line and "core" not in line
    assert line[1:3] == ["-np", "5"]


# ---- environment forwarding ----------------------------------------------------------------------
FORWARDED = {
    "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "1", "HOROVOD_FUSION_THRESHOLD": "0",
    "OMP_NUM_THREADS": "2", "KMP_AFFINITY": "granularity=fine", "KMP_BLOCKTIME": "1",
    "KNL_TRAIN_PROGRESS": "lines", "ITEX_VERBOSE": "0", "ONEDNN_VERBOSE": "0", "DNNL_VERBOSE": "0",
    "PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "PYTHONPATH": "/src", "VIRTUAL_ENV": "/venv",
}
NOT_FORWARDED = {
    "HOME": "/root", "USER": "me", "SECRET_TOKEN": "x", "MY_TF_VAR": "1", "XPATH": "1",
    "PATHS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "LANG": "C", "tf_lower": "1",
}


@needs_openmpi
def test_forwards_only_the_runtime_variables_with_x():
    line = launch.argv(LaunchPlan(np=1, command=CMD, preset=None), is_root=False, environ={**FORWARDED, **NOT_FORWARDED})
    names = _x_names(line)
    assert names == sorted(FORWARDED)
    for name in NOT_FORWARDED:
        assert name not in line
    # Only names go on the line, never values.
    assert "granularity=fine" not in line and "/opt/lib" not in line


def test_forwarded_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("KMP_TEST_FORWARD", "1")
    monkeypatch.setenv("UNRELATED_TEST_VAR", "1")
    names = launch.forwarded_env()
    assert "KMP_TEST_FORWARD" in names and "UNRELATED_TEST_VAR" not in names
    assert names == sorted(names)


# ---- Hydra (MPICH, Intel MPI) ---------------------------------------------------------------------
@pytest.mark.skipif(MPIRUN is None, reason="needs an mpirun to name")
def test_hydra_lines_list_the_forwarded_variables_and_pin_by_domain(monkeypatch, cores):
    cores(2)
    skx = snapshot.load(FIXTURES / "topology" / "skx-8160-2s.json")
    monkeypatch.setattr(topology, "detect", lambda root="/": skx)
    monkeypatch.setattr(launch, "mpi_flavour", lambda mpirun: "hydra")
    environ = {"PATH": "/usr/bin", "OMP_PROC_BIND": "close", "HOME": "/root"}
    line = launch.argv(LaunchPlan(np=2, command=CMD, preset=None), is_root=True, environ=environ)
    assert line == [MPIRUN, "-np", "2", "-genvlist", "OMP_PROC_BIND,PATH", *CMD]
    line = launch.argv(LaunchPlan(np=2, command=CMD, preset="generic"), is_root=True, environ=environ)
    assert line[:7] == [MPIRUN, "-np", "2", "-genvlist", "OMP_PROC_BIND,PATH", "-ppn", "2"]
    assert line[line.index("I_MPI_PIN_DOMAIN") - 1] == "-genv"
    assert ["-genv", "KNL_TRAIN_PRESET", "generic"] == line[line.index("KNL_TRAIN_PRESET") - 1:][:3]
    assert "--allow-run-as-root" not in line and line[-4:] == ["exec", "--", *CMD]


# ---- gloo and hostfiles --------------------------------------------------------------------------
def test_gloo_uses_horovodrun_with_localhost_slots():
    line = launch.argv(LaunchPlan(np=2, command=CMD, preset=None, controller="gloo"), is_root=True, environ={})
    assert os.path.basename(line[0]) == "horovodrun" and os.access(line[0], os.X_OK)
    assert line[1:] == ["--gloo", "-np", "2", "-H", "localhost:2", *CMD]
    assert "--allow-run-as-root" not in line


def test_gloo_with_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=4\nnode2 slots=4\n")
    line = launch.argv(LaunchPlan(np=8, command=CMD, preset=None, controller="gloo", hostfile=str(hosts)),
                       is_root=False, environ={})
    assert line[1:] == ["--gloo", "-np", "8", "--hostfile", str(hosts), *CMD]


def test_missing_hostfile_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=f"hostfile {tmp_path / 'hosts'} does not exist"):
        LaunchPlan(np=2, command=CMD, preset=None, hostfile=str(tmp_path / "hosts"))


@needs_openmpi
def test_mpirun_with_hostfile_skips_the_local_core_check(tmp_path, cores):
    cores(2)
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=32\nnode2 slots=32\n")
    line = launch.argv(LaunchPlan(np=64, command=CMD, preset=None, hostfile=str(hosts)), is_root=False, environ={})
    assert _after(line, "--hostfile") == str(hosts)
    assert _after(line, "--map-by") == "slot:PE=1"


@pytest.mark.parametrize("kwargs, needle", [
    ({"np": 0}, "-np must be >= 1"),
    ({"np": 2, "controller": "nccl"}, "unknown controller 'nccl'"),
    ({"np": 2, "command": ()}, "nothing to launch"),
    ({"np": 2, "threads_per_rank": -1}, "--threads-per-rank must be >= 1 .*got -1"),
])
def test_bad_plans_are_user_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        LaunchPlan(**{"command": CMD, **kwargs})


# ---- with a preset ------------------------------------------------------------------------------
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


# ---- supervise: the job's status and lines from the ranks' records ---------------------------------
# A stand-in for mpirun: writes the records it is given, may signal us, and exits with a status.
FAKE_LAUNCHER = r"""
import json, os, signal, sys
where, status, records, action = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
def put(r):
    with open(os.path.join(where, f"rank-{r['rank']:05d}.json"), "w") as f:
        json.dump(r, f)
if action == "term-parent":  # as a time limit or scancel does to knl-train launch
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    os.kill(os.getppid(), signal.SIGTERM)
    got = signal.sigwait({signal.SIGUSR1, signal.SIGTERM})
    records = [{**r, "signal": signal.Signals(got).name} for r in records]
for r in records:
    put(r)
if action == "linger":  # a rank left waiting for one that failed before Horovod started
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})
    open(os.path.join(where, "terminated"), "w").close()
sys.exit(status)
"""


def _supervise(tmp_path, status, records, action="none", **kw):
    import json
    import sys
    line = [sys.executable, "-c", FAKE_LAUNCHER, str(tmp_path), str(status), json.dumps(records), action]
    return launch.supervise(line, tmp_path, **kw)


def test_an_error_no_rank_said_is_said_by_launch_and_fails_the_job(tmp_path, capsys):
    rc = _supervise(tmp_path, 0, [{"rank": 1, "kind": "error", "message": "bad", "said": False}])
    assert rc == 2
    assert capsys.readouterr().err == "knl-train: error (rank 1): bad\n"


def test_an_error_a_rank_said_is_not_repeated(tmp_path, capsys):
    rc = _supervise(tmp_path, 0, [{"rank": 0, "kind": "error", "message": "bad", "said": True},
                                  {"rank": 1, "kind": "error", "message": "bad", "said": False}])
    assert rc == 2 and capsys.readouterr().err == ""


def test_a_stop_on_record_exits_0_with_the_stop_line_on_stdout(tmp_path, capsys):
    stop = {"rank": 0, "kind": "stopped", "signal": "SIGUSR1", "step": 40, "checkpoint": "/r/step-40"}
    assert _supervise(tmp_path, 1, [stop]) == 0  # mpirun, signalled too, exits non-zero
    assert capsys.readouterr().out == ("knl-train: stopped by SIGUSR1 at step 40: checkpoint /r/step-40 "
                                       "written; rerun the same command to resume from it\n")


def test_a_sigterm_to_launch_goes_to_the_launcher_once_as_the_signal_it_forwards(tmp_path, capsys):
    import signal
    stop = {"rank": 0, "kind": "stopped", "step": 8, "checkpoint": "c"}
    assert _supervise(tmp_path, 0, [stop], "term-parent", forward=signal.SIGUSR1) == 0
    # The launcher got SIGUSR1 (its record says so); the line names what we were sent.
    assert launch.outcome.read(tmp_path)[0]["signal"] == "SIGUSR1"
    assert capsys.readouterr().out.startswith("knl-train: stopped by SIGTERM at step 8: checkpoint c")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handlers are gone again


def test_without_records_the_launchers_status_is_the_jobs(tmp_path, capsys):
    assert _supervise(tmp_path, 3, []) == 3
    assert capsys.readouterr() == ("", "")


def test_a_job_that_lingers_after_an_error_is_ended_through_its_launcher(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "ERROR_GRACE_SECONDS", 0.5)
    rc = _supervise(tmp_path, 0, [{"rank": 1, "kind": "error", "message": "m", "said": True}], "linger")
    assert rc == 2 and (tmp_path / "terminated").exists()
