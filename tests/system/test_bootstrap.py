"""scripts/bootstrap.sh (make env): the no-MPI message for non-root users, and the fast no-op path."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import ROOT

SCRIPT = ROOT / "scripts" / "bootstrap.sh"
NOBODY = 65534
# What the script runs before (and while) it reports missing MPI; deliberately no mpicc, mpirun,
# g++, make, git or apt-get.
TOOLS = ("bash", "env", "dirname", "id", "cat", "sha256sum", "cut", "head", "tail", "mkdir", "ls", "rm")


def _as_non_root():
    """argv prefix that runs a command as a non-root user (or nothing if we are not root)."""
    if os.geteuid() != 0:
        return []  # already unprivileged: run the script as ourselves
    setpriv, runuser = shutil.which("setpriv"), shutil.which("runuser")
    if setpriv:
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if runuser:
        return [runuser, "-u", "nobody", "--"]
    pytest.skip("running as root without setpriv or runuser: cannot drop privileges to test "
                "bootstrap.sh as a non-root user")


@pytest.fixture
def sandbox():
    """A world-readable temp dir with bin/ (symlinks to TOOLS only), an empty venv/ and home/."""
    base = Path(tempfile.mkdtemp(prefix="knl-bootstrap-"))
    try:
        base.chmod(0o755)
        bindir = base / "bin"
        bindir.mkdir(mode=0o755)
        for tool in TOOLS:
            path = shutil.which(tool)
            if path is None:
                pytest.skip(f"{tool} is not installed here")
            (bindir / tool).symlink_to(os.path.realpath(path))
        for name in ("venv", "home"):
            (base / name).mkdir()
            if os.geteuid() == 0:
                os.chown(base / name, NOBODY, NOBODY)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_unprivileged(sandbox, *extra_tools):
    prefix = _as_non_root()
    env = {"PATH": str(sandbox / "bin"), "HOME": str(sandbox / "home"),
           "KNL_TRAIN_VENV": str(sandbox / "venv"), "LANG": "C"}
    bash = str(sandbox / "bin" / "bash")
    # The unprivileged user must really be unprivileged and able to read the script.
    probe = subprocess.run([*prefix, bash, "-c", f'id -u; test -r "{SCRIPT}" && echo readable'],
                           capture_output=True, text=True, env=env, timeout=30)
    lines = probe.stdout.split()
    if "readable" not in lines:
        pytest.skip(f"{SCRIPT} is not readable by uid {lines[:1]} ({probe.stderr.strip()})")
    assert lines[0] != "0"
    return subprocess.run([*prefix, bash, str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=60, cwd=str(sandbox))


def test_no_mpi_as_non_root_says_how_to_get_one(sandbox):
    assert not any((sandbox / "bin" / t).exists() for t in ("mpicc", "mpirun", "apt-get"))
    proc = _run_unprivileged(sandbox)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "[make env] error: no MPI found (mpicc and mpirun must be on PATH)" in proc.stderr
    assert "module load openmpi" in proc.stderr
    assert "apt-get install openmpi-bin libopenmpi-dev" in proc.stderr
    # It failed where intended: not on a tool missing from our PATH, not in Python.
    assert "command not found" not in out and "No such file" not in out
    assert "Traceback" not in out
    # Nothing was installed or created before giving up.
    assert list((sandbox / "venv").iterdir()) == []
    assert list((sandbox / "home").iterdir()) == []


def test_with_mpi_but_no_compiler_it_asks_for_build_tools_not_mpi(sandbox):
    # Control: the MPI message above is specific to MPI being absent.
    for name in ("mpicc", "mpirun"):
        fake = sandbox / "bin" / name
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    proc = _run_unprivileged(sandbox)
    assert proc.returncode != 0
    assert "no MPI found" not in proc.stderr
    assert "[make env] error: missing build tools:" in proc.stderr
    for tool in ("g++", "make", "git"):
        if not (sandbox / "bin" / tool).exists():
            assert tool in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_built_environment_is_an_up_to_date_no_op():
    venv = ROOT / ".venv"
    stamp = venv / ".knl-env-stamp"
    if not stamp.is_file():
        pytest.skip(f"{venv} was not built by scripts/bootstrap.sh (no {stamp.name}); run 'make env'")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KNL_TRAIN_VENV", "KNL_TRAIN_EXTRAS", "KNL_TRAIN_CACHE")}
    # Never let this test start a real (minutes-long) install into the shared .venv.
    check = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True,
                           env=env, timeout=60, cwd=str(ROOT))
    if check.returncode != 0:
        pytest.fail(f"{stamp} is stale (setup.cfg, bootstrap.sh or the MPI on PATH changed): "
                    "run 'make env' first")
    before = (stamp.read_bytes(), stamp.stat().st_mtime_ns, (venv / "bin" / "python").stat().st_mtime_ns)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60,
                          cwd=str(ROOT))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 15, f"the no-op bootstrap took {elapsed:.1f}s"
    assert proc.stdout.strip() == f"[make env] environment is up to date ({venv})"
    assert proc.stderr == ""
    after = (stamp.read_bytes(), stamp.stat().st_mtime_ns, (venv / "bin" / "python").stat().st_mtime_ns)
    assert after == before
