"""A private, real Slurm cluster for tests: one slurmctld plus one slurmd per (fake) node.

Recipe: docs reference jobs_and_schedulers.md sections 3.1 (single node, auth/none, no systemd),
3.2 (fake nodes: several ``slurmd -N`` on one host) and 3.4 (non-root). Everything lives under
one directory with its own free ports, so clusters and parallel test runs do not collide.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

DAEMONS = ("slurmctld", "slurmd", "sbatch")
# Daemons live in /usr/sbin, which is often not on a non-root PATH.
EXTRA_PATH = ("/usr/sbin", "/usr/bin")
# slurmd -C fields copied to the node line; anything more than the host has drains the node.
HW_FIELDS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")


def _search_path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join([p for p in parts if p] + [p for p in EXTRA_PATH if p not in parts])


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=_search_path())


def available() -> Optional[str]:
    """None when slurmctld, slurmd and sbatch are installed, else why the Slurm tests skip."""
    missing = [name for name in DAEMONS if _which(name) is None]
    if not missing:
        return None
    return (f"Slurm is not installed ({'/'.join(missing)} not found): make test installs it with "
            "apt when run as root (apt-get install slurmctld slurmd slurm-client); elsewhere "
            "install them to run these tests")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all held open while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_hardware() -> dict[str, str]:
    """This host's CPUs/Boards/SocketsPerBoard/CoresPerSocket/ThreadsPerCore from ``slurmd -C``."""
    proc = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"slurmd -C failed ({proc.returncode}): {proc.stderr.strip()}")
    # First line: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ..."
    fields = dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok)
    hw = {k: fields[k] for k in HW_FIELDS if k in fields}
    if "CPUs" not in hw:
        raise RuntimeError(f"cannot parse slurmd -C output: {proc.stdout!r}")
    return hw


try:
    # Looked up here, not in the forked child: dlopen after fork in a threaded process can hang.
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    # A pytest run killed with SIGKILL must not leave daemons holding ports and state.
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class SlurmCluster:
    """slurmctld + slurmd per node under ``root``; ``nodes=("localhost",)`` or fake nodes."""

    def __init__(self, root: Path, nodes: Sequence[str] = ("localhost",)):
        self.root = Path(root).resolve()
        self.nodes = tuple(nodes)
        if not self.nodes or len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"need distinct node names, got {nodes!r}")
        self.conf = self.root / "slurm.conf"
        self.logdir = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        ports = free_ports(1 + len(self.nodes))
        self.ctld_port, self.node_ports = ports[0], dict(zip(self.nodes, ports[1:]))
        self.hardware = node_hardware()

    # ---- configuration -------------------------------------------------------------------
    def slurm_conf(self) -> str:
        """The slurm.conf text for this cluster."""
        r = self.root
        user = pwd.getpwuid(os.getuid()).pw_name
        # task/affinity needs root to bind other users' tasks; unprivileged daemons use task/none.
        task = "task/affinity" if os.getuid() == 0 else "task/none"
        single = self.nodes == ("localhost",)
        # Fake nodes share the host, so everything per-slurmd is split by %n (node name).
        suffix = "" if single else "-%n"
        hw = " ".join(f"{k}={v}" for k, v in self.hardware.items())
        lines = [
            "ClusterName=knltest",
            "SlurmctldHost=localhost",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={self.ctld_port}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool{suffix}",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd{suffix}.pid",
            f"SlurmctldLogFile={self.logdir}/slurmctld.log",
            f"SlurmdLogFile={self.logdir}/slurmd{suffix}.log",
            "ProctrackType=proctrack/linuxproc",
            f"TaskPlugin={task}",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.logdir}/jobcomp.log",
            "MailProg=/bin/true",
            "MinJobAge=600",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
        ]
        for name in self.nodes:
            host = "" if single else " NodeHostname=localhost"
            lines.append(f"NodeName={name}{host} NodeAddr=127.0.0.1 Port={self.node_ports[name]} "
                         f"{hw} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        for d in (self.root, self.logdir, self.root / "state"):
            d.mkdir(parents=True, exist_ok=True)
        # Pre-created, or each slurmd logs an error about its spool directory.
        single = self.nodes == ("localhost",)
        for name in self.nodes:
            (self.root / ("spool" if single else f"spool-{name}")).mkdir(exist_ok=True)
        self.conf.write_text(self.slurm_conf())

    # ---- environment and clients ---------------------------------------------------------
    def env(self) -> dict[str, str]:
        """os.environ with this cluster's SLURM_CONF and /usr/sbin, /usr/bin on PATH."""
        # SLURM_* from an enclosing job (tests run under sbatch) would point srun at that job.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _search_path()
        return env

    def run(self, *args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``run("sinfo", "-h")``) against this cluster."""
        return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              env=self.env(), timeout=timeout, **kwargs)

    def idle_nodes(self) -> int:
        """Number of idle nodes according to sinfo (0 while the controller is not answering)."""
        try:
            proc = self.run("sinfo", "-h", "-t", "idle", "-o", "%D", timeout=10)
        except subprocess.TimeoutExpired:
            return 0
        if proc.returncode != 0:
            return 0
        return sum(int(x) for x in proc.stdout.split() if x.isdigit())

    # ---- lifecycle -----------------------------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> None:
        out = open(self.logdir / f"{key}.out", "wb")
        try:
            self.procs[key] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT, env=self.env(),
                                               cwd=self.root, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def start(self, timeout: float = 30) -> "SlurmCluster":
        """Start the daemons (foreground, -D) and wait until every node is idle."""
        if self.procs:
            raise RuntimeError("cluster already started")
        self._prepare()
        # -c: cold start, no state from an earlier run in this directory.
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-c"])
        for name in self.nodes:
            self._spawn(f"slurmd-{name}", [_which("slurmd") or "slurmd", "-D", "-N", name])
        deadline = time.monotonic() + timeout
        while True:
            if self.idle_nodes() == len(self.nodes):
                return self
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = (f"{', '.join(dead)} exited" if dead
                       else f"{len(self.nodes)} node(s) not idle after {timeout:.0f}s")
                self.stop()
                raise RuntimeError(f"Slurm cluster in {self.root} did not start: {why}\n"
                                   + self.log_tail())
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of each daemon's log, for error messages."""
        single = self.nodes == ("localhost",)
        logs = {"slurmctld": "slurmctld.log"}
        logs.update({f"slurmd-{n}": "slurmd.log" if single else f"slurmd-{n}.log" for n in self.nodes})
        parts = []
        for key, name in logs.items():
            # Captured stdout/stderr repeats the log under -D, but is all there is when the
            # daemon died before opening its log (a bad slurm.conf, say).
            for path in (self.logdir / name, self.logdir / f"{key}.out"):
                text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
                if text:
                    parts.append(f"--- {path} ---\n" + "\n".join(text))
                    break
        return "\n".join(parts) or "(no daemon output)"

    def pids(self) -> dict[str, int]:
        """PID of each daemon started by this object (``slurmctld``, ``slurmd-<node>``)."""
        return {k: p.pid for k, p in self.procs.items()}

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the daemons (slurmd first), SIGKILL what is left after ``timeout``; idempotent."""
        order = [k for k in self.procs if k != "slurmctld"] + [k for k in self.procs if k == "slurmctld"]
        for key in order:
            if self.procs[key].poll() is None:
                self.procs[key].terminate()
        deadline = time.monotonic() + timeout
        for key in order:
            proc = self.procs[key]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
