"""The run directory (knl_train/train/rundir.py): its checks, and one owner at a time.

The lock tests hold it in real child processes, so the kernel's fcntl locks decide, as they do
between two trainings.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from knl_train.errors import UserError
from knl_train.train import config, rundir
from tests.support import ROOT, clean_env

# A holder: takes the lock on argv[1], says so, and keeps it until its stdin closes.
HOLDER = ("import sys\nfrom knl_train.train import rundir\n"
          "rundir.acquire(sys.argv[1])\nprint('locked', flush=True)\nsys.stdin.read()\n")


@pytest.fixture()
def holder():
    """Start a process that holds a run directory's lock: ``holder(run_dir, job_id=None)``."""
    procs = []

    def start(run_dir, job_id=None):
        env = {k: v for k, v in clean_env().items() if k not in rundir.JOB_ID_VARS}
        if job_id:
            env["SLURM_JOB_ID"] = job_id
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line == "locked\n", line + proc.stderr.read()
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture()
def acquired():
    """Locks this test takes in-process, released at its end (not at pytest's exit)."""
    locks = []

    def take(run_dir):
        locks.append(rundir.acquire(run_dir))
        return locks[-1]
    yield take
    for lock in locks:
        lock.release()


# ---- the lock ----------------------------------------------------------------------------------
def test_a_second_holder_is_refused_with_the_owner_named(tmp_path, holder):
    run = tmp_path / "run"
    first = holder(run, job_id="4242")
    with pytest.raises(UserError) as e:
        rundir.acquire(run)
    owner = json.loads((run / rundir.LOCK).read_text())
    assert str(e.value) == (
        f"run_dir {run} is in use by another training (host {socket.gethostname()}, "
        f"PID {first.pid}, job 4242, started {owner['started']}); wait for it to end or stop it, "
        "or set another run_dir")
    assert (owner["host"], owner["pid"], owner["job_id"]) == (socket.gethostname(), first.pid, "4242")


def test_a_second_process_is_refused_too(tmp_path, holder):
    run = tmp_path / "run"
    first = holder(run)
    second = subprocess.run([sys.executable, "-c", HOLDER, str(run)], capture_output=True, text=True,
                            env=clean_env(), cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120)
    assert second.returncode == 1 and second.stdout == ""
    assert f"UserError: run_dir {run} is in use by another training (host " in second.stderr
    assert f"PID {first.pid}, started " in second.stderr  # no job id: none was set


def test_a_released_lock_is_free_and_empty_and_taken_without_a_note(tmp_path, holder, acquired, capsys):
    run = tmp_path / "run"
    first = holder(run)
    first.communicate("")  # stdin closed: it exits normally
    assert first.returncode == 0
    assert (run / rundir.LOCK).read_text() == ""
    lock = acquired(run)
    assert lock.previous is None and lock.checked
    assert "took over" not in capsys.readouterr().out
    me = json.loads((run / rundir.LOCK).read_text())
    assert (me["host"], me["pid"]) == (socket.gethostname(), os.getpid())


def test_a_dead_owners_lock_is_taken_over_with_one_line(tmp_path, holder, acquired, capsys):
    run = tmp_path / "run"
    first = holder(run, job_id="77")
    first.kill()  # SIGKILL: no exit handler; the kernel drops its lock, the file still names it
    first.wait()
    lock = acquired(run)
    assert (lock.previous.pid, lock.previous.job_id) == (first.pid, "77")
    out = capsys.readouterr().out.splitlines()
    assert out == [f"knl-train: took over {run / rundir.LOCK} from {lock.previous.text()}, "
                   "which ended without releasing it"]
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()


def test_the_same_process_may_acquire_again_and_keeps_its_lock(tmp_path, acquired):
    run = tmp_path / "run"
    lock = acquired(run)
    assert rundir.acquire(run) is lock  # a second run() in one Python session
    other = subprocess.run([sys.executable, "-c", HOLDER, str(run)], capture_output=True, text=True,
                           env=clean_env(), cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120)
    assert other.returncode == 1 and f"PID {os.getpid()}, started " in other.stderr


def test_without_fcntl_locks_a_live_owner_on_this_host_is_still_refused(tmp_path, holder, acquired,
                                                                      monkeypatch, capsys):
    run = tmp_path / "run"
    first = holder(run)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(rundir.fcntl, "lockf", no_locks)
    with pytest.raises(UserError, match=f"in use by another training \\(host .*, PID {first.pid}, "):
        rundir.acquire(run)
    first.kill()
    first.wait()
    lock = acquired(run)
    assert lock.previous.pid == first.pid and not lock.checked
    err = capsys.readouterr().err
    assert f"knl-train: warning: the file system of {run} has no fcntl locks" in err
    assert "only runs on this host" in err


def test_without_fcntl_locks_an_owner_on_another_host_is_named_in_a_warning(tmp_path, acquired,
                                                                          monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).write_text(json.dumps({"host": "node-17", "pid": 1, "job_id": "9",
                                                "started": "2026-01-01T00:00:00+0000"}))

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(rundir.fcntl, "lockf", no_locks)
    lock = acquired(run)
    assert not lock.checked and lock.previous is None
    err = capsys.readouterr().err
    assert ("names host node-17, PID 1, job 9, started 2026-01-01T00:00:00+0000, which cannot be "
            f"checked from {socket.gethostname()}; make sure that training has ended") in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_lock_file_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / rundir.LOCK).symlink_to("/dev/full")  # opens and locks, but takes no bytes
    with pytest.raises(UserError) as e:
        rundir.acquire(tmp_path)
    assert str(e.value).startswith(f"cannot write the lock file {tmp_path / rundir.LOCK}: ")
    assert str(e.value).endswith("; free space or fix the run directory's permissions, or set "
                                 "another run_dir")


# ---- the path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ['""', "'  '"])
def test_an_empty_run_dir_is_refused_at_load(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {value}\n")
    with pytest.raises(UserError) as e:
        config.load(str(path))
    assert str(e.value) == (f"run_dir {value.replace(chr(34), chr(39))} is empty: it would train "
                            "into the current directory; set run_dir to a directory of its own, "
                            "e.g. --set run_dir=runs/demo")


@pytest.mark.parametrize("seed, ok", [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_the_seed_range_is_checked_at_load(seed, ok):
    if ok:
        assert config.load(None, [f"seed={seed}"]).seed == seed
        return
    with pytest.raises(UserError) as e:
        config.load(None, [f"seed={seed}"])
    assert str(e.value) == f"config: seed must be an integer from 0 to 4294967295, got {seed}"


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError) as e:
        rundir.acquire(tmp_path / "f")
    assert str(e.value) == (f"run_dir {tmp_path / 'f'} is a file, not a directory; set run_dir to a "
                            "directory (new or a run's), not a file")


def test_a_run_dir_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError) as e:
        rundir.acquire(tmp_path / "f" / "a" / "run")
    assert str(e.value) == (f"run_dir {tmp_path / 'f' / 'a' / 'run'} lies under {tmp_path / 'f'}, "
                            "which is a file; set run_dir to a path under a directory")
    assert (tmp_path / "f").read_text() == "x"


def _check_as_a_user_without_write_permission(run) -> str:
    """``check_usable(run)``'s error, as this user, or as ``nobody`` in a forked child when the
    tests run as root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        with pytest.raises(UserError) as e:
            rundir.check_usable(run)
        return str(e.value)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, check, report through the pipe, leave at once
        try:
            os.setgid(65534)
            os.setuid(65534)
            rundir.check_usable(run)
            text = "passed"
        except BaseException as e:  # noqa: BLE001  whatever it is, the parent shows it
            text = str(e)
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


@pytest.mark.parametrize("sub, why", [("", "is not writable by this user"),
                                      ("new/run", "cannot be created: {top} is not writable by this user")])
def test_a_run_dir_this_user_cannot_write(sub, why):
    top = tempfile.mkdtemp(prefix="knl-rundir-")  # in /tmp, which nobody may enter
    try:
        os.chmod(top, 0o555)
        run = os.path.join(top, sub) if sub else top
        assert _check_as_a_user_without_write_permission(run) == (
            f"run_dir {run} {why.format(top=top)}; fix its permissions, or set run_dir to a "
            "writable directory")
    finally:
        os.chmod(top, 0o755)
        os.rmdir(top)


def test_a_usable_run_dir_passes(tmp_path):
    rundir.check_usable(tmp_path)
    rundir.check_usable(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # checking creates nothing
