"""The run directory: a usable path (checked at load time and at start), and one owner at a time.

``validate`` is the load-time check of the config's string (no file system: a study renders
configs on a login node where the path may not exist yet). At the start of a run, rank 0 calls
``acquire``: it checks the path on the file system (``check_usable``), creates the directory and
takes ``run_dir/.knl-train.lock`` with an ``fcntl`` (POSIX) lock for the life of the process, so a
second training on the same directory stops at once with a line naming the owner. Nothing else
in the run directory is written before this.

The lock belongs to the process, not to the file: the kernel drops it when the process ends,
however it ends (exit, SIGKILL, a crash). The file itself stays; it names its owner (host, PID,
job id, start time), and a normal exit empties it. A later run that finds the file still naming
someone, yet gets the lock, took over from a process that died holding it, and says so.
The file is rewritten in place, never replaced (a new inode would be a new, unlocked lock) and
never deleted (a process that opened it just before the unlink would lock a file nobody else
sees). POSIX locks, unlike ``flock``, are not inherited by forked children, so a helper process
cannot keep a dead run's directory busy; they work on NFS (with lockd), GPFS and Lustre mounted
with ``flock`` or ``localflock``.

File systems without fcntl locks (Lustre mounted ``noflock``, NFS without lockd) answer with
ENOSYS, ENOLCK or EOPNOTSUPP. Then ``acquire`` falls back to the file's content: an owner on this
host whose PID is alive makes the directory busy, a dead one is taken over as above, and an owner
on another host cannot be checked: a warning names it and the run goes on. Two runs started at
the same moment on such a file system are not caught.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from knl_train import log as knl_log
from knl_train.errors import UserError

log = knl_log.get(__name__)

LOCK = ".knl-train.lock"
# The batch systems' job ids, in the order they are looked up (LOCAL_JOB_ID: the studies' local queue).
JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LOCAL_JOB_ID")
_BUSY = (errno.EACCES, errno.EAGAIN)
_UNSUPPORTED = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP)
# This process's locks by real path. A POSIX lock is the process's: a second fd on the file would
# "lock" it again, and closing that fd would drop the first one's lock too.
_HELD: dict = {}


def validate(run_dir: str) -> None:
    """The load-time check of ``run_dir`` as written (no file system access): ``UserError``."""
    if not isinstance(run_dir, str) or not run_dir.strip():
        raise UserError(f"run_dir {run_dir!r} is empty: it would train into the current directory; "
                        "set run_dir to a directory of its own, e.g. --set run_dir=runs/demo")
    if "\0" in run_dir:
        raise UserError(f"run_dir {run_dir!r} contains a NUL character; choose another path")


def check_usable(run_dir) -> None:
    """``run_dir`` is, or can be made, a directory this process may write: else ``UserError``."""
    path = Path(os.path.abspath(run_dir))
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"run_dir {run_dir} is a file, not a directory; "
                            "set run_dir to a directory (new or a run's), not a file")
        existing = path
        while not existing.exists():
            existing = existing.parent
    except OSError as e:  # a parent this user may not enter
        raise UserError(f"run_dir {run_dir} cannot be reached: {e.strerror or e} ({e.filename}); "
                        "fix the permissions of its parents, or set another run_dir") from None
    if not existing.is_dir():
        raise UserError(f"run_dir {run_dir} lies under {existing}, which is a file; "
                        "set run_dir to a path under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise UserError(f"run_dir {run_dir} {what} by this user; fix its permissions, "
                        "or set run_dir to a writable directory")


@dataclass(frozen=True)
class Owner:
    """Who holds (or held) a run directory, as its lock file says."""
    host: str
    pid: int
    job_id: Optional[str]
    started: str

    @classmethod
    def me(cls) -> "Owner":
        job = next((os.environ[v] for v in JOB_ID_VARS if os.environ.get(v)), None)
        return cls(host=socket.gethostname(), pid=os.getpid(), job_id=job,
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def parse(cls, text: str) -> Optional["Owner"]:
        """The owner a lock file names, or None (empty: released; or not ours to read)."""
        try:
            data = json.loads(text)
            return cls(host=str(data["host"]), pid=int(data["pid"]), job_id=data.get("job_id"),
                       started=str(data.get("started", "?")))
        except (ValueError, TypeError, KeyError):
            return None

    def text(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"host {self.host}, PID {self.pid}{job}, started {self.started}"

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "job_id": self.job_id,
                           "started": self.started}, sort_keys=True) + "\n"


class Lock:
    """This process's hold on a run directory (``acquire`` makes one); ``release`` ends it."""

    def __init__(self, path: Path, fd: int, previous: Optional[Owner], checked: bool):
        self.path = path
        self.previous = previous  # the dead owner taken over from, if any
        self.checked = checked    # False: no fcntl locks here, only the same-host check
        self._fd: Optional[int] = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the file (a normal end: nobody to take over from) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only file system: the next run notes a takeover, no harm
        os.close(fd)  # closing drops the POSIX lock


def acquire(run_dir) -> Lock:
    """Rank 0, before anything in ``run_dir`` is written: the directory checked, created and
    locked for this process (released at exit). ``UserError`` if another training holds it."""
    check_usable(run_dir)
    path = Path(run_dir) / LOCK
    held = _HELD.get(os.path.realpath(path))
    if held is not None and held.held:
        return held  # a second run in this process (the Python API): it owns the directory already
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(_cannot("create", path, e)) from None
    try:
        lock = _lock(fd, path, run_dir)
        try:  # in place: a replaced file would be a new, unlocked inode
            os.ftruncate(fd, 0)
            os.pwrite(fd, Owner.me().to_json().encode(), 0)
            os.fsync(fd)
        except OSError as e:
            raise UserError(_cannot("write", path, e)) from None
    except BaseException:
        os.close(fd)
        raise
    atexit.register(lock.release)
    _HELD[os.path.realpath(path)] = lock
    if lock.previous is not None:
        log.info(f"took over {path} from {lock.previous.text()}, which ended without releasing it",
                 extra=knl_log.STDOUT)
    return lock


def _lock(fd: int, path: Path, run_dir) -> Lock:
    """The lock on ``fd``, or ``UserError`` naming the owner; the fallback where there is none."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _BUSY:
            raise UserError(busy_message(run_dir, Owner.parse(_read(fd)))) from None
        if e.errno not in _UNSUPPORTED:
            raise UserError(f"cannot lock {path}: {e.strerror or e}; set another run_dir") from None
        return _unlocked(fd, path, run_dir, e)
    return Lock(path, fd, Owner.parse(_read(fd)), checked=True)


def _unlocked(fd: int, path: Path, run_dir, error: OSError) -> Lock:
    """No fcntl locks on this file system: judge the owner the file names, where we can."""
    owner = Owner.parse(_read(fd))
    here = socket.gethostname()
    if owner is not None and owner.host == here and owner.pid != os.getpid() and _alive(owner.pid):
        raise UserError(busy_message(run_dir, owner))
    if owner is not None and owner.host != here:
        log.warning(f"the file system of {run_dir} has no fcntl locks ({error.strerror}): {path} "
                    f"names {owner.text()}, which cannot be checked from {here}; make sure that "
                    "training has ended, since two runs in one run_dir overwrite each other")
        return Lock(path, fd, None, checked=False)
    log.warning(f"the file system of {run_dir} has no fcntl locks ({error.strerror}): only runs "
                f"on this host ({here}) are kept out of it")
    return Lock(path, fd, owner, checked=False)


def _cannot(what: str, path: Path, error: OSError) -> str:
    return (f"cannot {what} the lock file {path}: {error.strerror or error}; free space or fix the "
            "run directory's permissions, or set another run_dir")


def busy_message(run_dir, owner: Optional[Owner]) -> str:
    who = owner.text() if owner else "a process that is still starting"
    return (f"run_dir {run_dir} is in use by another training ({who}); wait for it to end or "
            "stop it, or set another run_dir")


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
