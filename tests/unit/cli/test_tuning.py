"""The tuning commands (knl_train/cli/tuning.py) as a user runs them: ``launch --dry-run`` in
this process and through the console script, ``env``, ``topology``, and their one-line errors."""

from __future__ import annotations

import os

import pytest

from knl_train import cli
from knl_train.tuning import preset, snapshot, topology
from tests.support import FIXTURES, run_cli
from tests.support.mpi import MPIRUN, needs_openmpi

SNAPSHOTS = FIXTURES / "topology"


# ---- launch ----------------------------------------------------------------------------------------
@needs_openmpi
def test_dry_run_in_process_prints_the_line_and_leaves_no_root_switch_in_environ(monkeypatch, capsys):
    for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KNL_TRAIN_PROGRESS", "lines")  # main/cmd_launch only setdefault these
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("ITEX_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv("KNL_TRAIN_ITEX", raising=False)  # ITEX cannot be enabled after TF's import
    before = dict(os.environ)
    assert cli.main(["launch", "--dry-run", "-np", "1", "--", "echo", "hi"]) == 0
    out, err = capsys.readouterr()
    assert dict(os.environ) == before
    assert not [k for k in os.environ if k.startswith("OMPI_ALLOW")]
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in out + err
    printed = out.strip().split()
    assert printed[0] == MPIRUN and printed[-2:] == ["echo", "hi"]
    assert ("--allow-run-as-root" in printed) == (os.geteuid() == 0)
    assert err.startswith("knl-train launch: ")


@needs_openmpi
def test_cli_dry_run_prints_the_line_and_does_not_run_it(tmp_path):
    marker = tmp_path / "ran"
    proc = run_cli("launch", "--dry-run", "-np", "2", "--", "touch", marker, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    words = lines[0].split()
    assert words[:3] == [MPIRUN, "-np", "2"] and words[-2:] == ["touch", str(marker)]
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in proc.stdout + proc.stderr


@needs_openmpi
def test_cli_dry_run_echo_hi():
    proc = run_cli("launch", "--dry-run", "-np", "2", "--", "echo", "hi", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].endswith(" echo hi")
    assert "hi" not in proc.stdout.splitlines()  # echo never ran


def test_launch_errors_are_one_line():
    p = run_cli("launch", "-np", "2", "--preset", "knl-7520", "--dry-run", "--", "true")
    assert p.returncode == 2 and "unknown preset 'knl-7520'" in p.stderr and "Traceback" not in p.stderr
    cores = len(os.sched_getaffinity(0))
    p = run_cli("launch", "-np", str(cores + 1), "--dry-run", "--", "true")
    assert p.returncode == 2 and "--oversubscribe" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("env", "--preset", "knl-7250", "--ranks-per-node", "2")
    assert p.returncode == 0 and "# warning: preset knl-7250" in p.stdout


# ---- topology and env ------------------------------------------------------------------------------
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


# ---- --ranks-per-node: a whole number >= 1 wherever it is taken ------------------------------------
@pytest.mark.parametrize("command", [["env", "--preset", "generic"], ["launch", "-np", "2"]])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_ranks_per_node_below_one_is_refused_when_parsed(command, value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--ranks-per-node", value, "--", "true"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (f"knl-train {command[0]}: error: argument --ranks-per-node: must be a whole number "
            f">= 1, got '{value}'; leave it out for the preset's default") in err


def test_env_with_a_preset_for_another_cpu_suggests_the_nominal_topology():
    p = run_cli("env", "--preset", "knl-7250", "--ranks-per-node", str(len(os.sched_getaffinity(0)) + 2))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("knl-train: error: ") and "pass --topology nominal" in p.stderr
    p = run_cli("env", "--preset", "knl-7250", "--ranks-per-node", "4", "--topology", "nominal", check=True)
    assert "# local rank 0 of 4 per node" in p.stdout
