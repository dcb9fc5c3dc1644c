"""``knl-train launch``: a ``LaunchPlan`` on this host, and the line that runs it.

The line comes from ``launchers``: Open MPI's ``mpirun``, Hydra's (MPICH, Intel MPI), found by
asking ``mpirun --version``, or ``horovodrun --gloo``. With a preset every rank runs under
``knl-train exec``, which applies the rank's share of the plan. Open MPI refuses to run as root
without ``--allow-run-as-root``; we pass that switch only when we are root, and never through
the environment, so it cannot leak into other runs.

``run`` starts the line as a child and stays to the end (``supervise``): the ranks record how
they ended in a directory it gives them (``runtime.outcome``), so that a user error ends the
job within seconds with status 2, and a stop by a signal exits 0 with its line on our stdout.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from knl_train import log as logs
from knl_train.errors import UserError
from knl_train.runtime import outcome
from knl_train.runtime.rankenv import LAUNCH_VARS, VAR_PREFIX, RankEnv
from knl_train.tuning import launchers, plan as planning, show
from knl_train.tuning.plan import NodePlan

log = logs.get(__name__)

CONTROLLERS = ("mpi", "gloo")
# Once a rank has put an error on record, the others leave within seconds (Horovod's shutdown
# tells them); a job still running this much later (a rank that failed before Horovod started,
# leaving the others waiting) is ended through its launcher.
ERROR_GRACE_SECONDS = 15.0
_POLL_SECONDS = 0.25
# Forwarded to remote ranks with -x (local ranks inherit the environment anyway).
FORWARD_PREFIXES = ("TF_", "HOROVOD_", "OMP_", "KMP_", VAR_PREFIX, "ITEX_", "ONEDNN_", "DNNL_")
FORWARD_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")


@dataclass(frozen=True)
class LaunchPlan:
    np: int
    command: Tuple[str, ...]
    controller: str = "mpi"
    hostfile: Optional[str] = None
    oversubscribe: bool = False
    # Cores bound to each rank; 0 = this host's cores divided by the ranks on it.
    threads_per_rank: int = 0
    # A built-in preset or preset file, "auto" (chosen from the detected CPU), or None: bind
    # only and leave TF at its defaults.
    preset: Optional[str] = "auto"
    # 0: -np on one host, the preset's default with a hostfile.
    ranks_per_node: int = 0

    def __post_init__(self):
        if self.np < 1:
            raise UserError(f"-np must be >= 1, got {self.np}")
        if self.threads_per_rank < 0:
            raise UserError(f"--threads-per-rank must be >= 1 (or 0: cores / ranks), got {self.threads_per_rank}")
        if self.controller not in CONTROLLERS:
            raise UserError(f"unknown controller {self.controller!r}; choose one of {', '.join(CONTROLLERS)}")
        if not self.command:
            raise UserError("nothing to launch: put the command after '--', "
                            "e.g. knl-train launch -np 2 -- knl-train train --config C")
        if self.hostfile and not os.path.isfile(self.hostfile):
            raise UserError(f"hostfile {self.hostfile} does not exist")
        if self.ranks_per_node < 0:
            raise UserError(f"--ranks-per-node must be >= 1, got {self.ranks_per_node}")
        if not self.hostfile and self.ranks_per_node and self.ranks_per_node != self.np:
            raise UserError(f"-np {self.np} with --ranks-per-node {self.ranks_per_node} on one host: "
                            "pass --hostfile for several nodes, or drop --ranks-per-node")

    def node(self, topology=None) -> Optional[NodePlan]:
        """The preset's plan for one node of this launch, or None without a preset."""
        if self.preset is None:
            return None
        ranks = self.ranks_per_node or (0 if self.hostfile else self.np)
        return planning.node_plan(self.preset, ranks, cores_per_rank=self.threads_per_rank,
                                  oversubscribe=self.oversubscribe, topology=topology)


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


@functools.lru_cache(maxsize=None)
def mpi_flavour(mpirun: str) -> str:
    """'openmpi', 'hydra' (MPICH, Intel MPI) or 'unknown', from ``mpirun --version``."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout + out.stderr).lower()
    if "open mpi" in text or "open-rte" in text:
        return "openmpi"
    if "hydra" in text or "intel" in text or "mpich" in text:
        return "hydra"
    return "unknown"


def forwarded_env(environ=None) -> List[str]:
    environ = os.environ if environ is None else environ
    # A plan's variables left over in the launching shell would change the ranks' plans.
    return sorted(k for k in environ if k not in LAUNCH_VARS
                  and (k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES)))


def _threads(plan: LaunchPlan) -> int:
    if plan.threads_per_rank:
        return plan.threads_per_rank
    if plan.hostfile:
        return 1
    return max(1, available_cores() // plan.np)


def check_fits(plan: LaunchPlan) -> None:
    """Single-host runs: ranks x threads must fit the cores we may use, unless oversubscribing."""
    if plan.hostfile or plan.oversubscribe:
        return
    need, have = plan.np * _threads(plan), available_cores()
    if need > have:
        raise UserError(
            f"{plan.np} ranks x {_threads(plan)} threads need {need} cores, but this process may use "
            f"{have}. Use fewer ranks, or pass --oversubscribe to share cores (for testing only: "
            "it is much slower and nothing is bound).")


def knl_train_exec() -> List[str]:
    """``knl-train exec --`` of the Python running us (an unactivated venv is not on PATH)."""
    beside = beside_python("knl-train")
    if beside:
        return [beside, "exec", "--"]
    return [sys.executable, "-m", "knl_train.cli", "exec", "--"]


def beside_python(program: str) -> Optional[str]:
    """``program`` installed next to the Python running us, if there (a venv's own scripts)."""
    beside = os.path.join(os.path.dirname(sys.executable), program)
    return beside if os.access(beside, os.X_OK) else None


def argv(plan: LaunchPlan, *, is_root: Optional[bool] = None, environ=None,
         node: Optional[NodePlan] = None, outcome_dir: Optional[str] = None) -> List[str]:
    """The full launcher command line for ``plan`` (``node``: its ``plan.node()``, if made already;
    ``outcome_dir``: where the ranks record how they ended, see ``supervise``)."""
    node = plan.node() if node is None else node
    if node is None:
        check_fits(plan)
        exports, command = {}, list(plan.command)
    else:
        ref = planning.preset_ref(plan.preset, node)
        exports = launchers.rank_env(node, ref, oversubscribe=plan.oversubscribe).to_environ()
        command = [*knl_train_exec(), *plan.command]
    if outcome_dir:
        exports = {**exports, **RankEnv(outcome=outcome_dir).to_environ()}
    name, program = _launcher(plan.controller)
    request = launchers.Request(
        node, ranks=plan.np, exports=exports, forward=tuple(forwarded_env(environ)),
        hostfile=plan.hostfile, oversubscribe=plan.oversubscribe, cores_per_rank=_threads(plan),
        program=program, as_root=(os.geteuid() == 0) if is_root is None else is_root)
    return launchers.get(name).command(request) + command


def _launcher(controller: str) -> Tuple[str, str]:
    """The launcher's registered name and executable: horovodrun for gloo, else this MPI's mpirun."""
    if controller == "gloo":
        # The horovodrun of the Python running us (an unactivated venv is not on PATH).
        program = beside_python("horovodrun") or shutil.which("horovodrun")
        if not program:
            raise UserError("horovodrun is not on PATH; run 'make env' or activate .venv")
        return "horovodrun", program
    mpirun = shutil.which("mpirun")
    if not mpirun:
        raise UserError("mpirun is not on PATH: load your site's MPI module (module load openmpi) "
                        "or run 'make env', which installs Open MPI on Debian/Ubuntu")
    # Hydra (MPICH, Intel MPI) binds by I_MPI_PIN_* / -bind-to, and takes the environment by -genvlist.
    return ("mpirun" if mpi_flavour(mpirun) == "openmpi" else "impi"), mpirun


def prepare(plan: LaunchPlan, outcome_dir: Optional[str] = None) -> List[str]:
    """``knl-train launch``: plan the node, say what the plan warns of, and give the line."""
    node = plan.node()
    if node is not None:
        show.tell(node)
        if plan.hostfile and plan.preset == "auto":
            log.info(f"note: the preset ({node.preset.name}) and the cores per rank were worked out "
                     "on this host; pass --preset and --ranks-per-node if the nodes in the hostfile "
                     "differ from it")
    return argv(plan, node=node, outcome_dir=outcome_dir)


def default_progress(environ=None, *, tty: Optional[bool] = None) -> None:
    """Ranks draw a progress bar on a terminal and write lines into a log file, unless told."""
    environ = os.environ if environ is None else environ
    tty = sys.stdout.isatty() if tty is None else tty
    environ.setdefault(RankEnv.var("progress"), "bar" if tty else "lines")


def render(line: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in line)


# ---- running the line ----------------------------------------------------------------------------
def run(plan: LaunchPlan) -> int:
    """``knl-train launch``: run ``plan``'s line under ``supervise``; the job's exit status."""
    where = tempfile.mkdtemp(prefix="knl-train-launch-")
    try:
        line = prepare(plan, outcome_dir=where)
        logs.write_line(sys.stderr, f"knl-train launch: {render(line)}")
        # Open MPI passes SIGUSR1 on to the ranks; a SIGTERM would start its kill sequence.
        # horovodrun passes a SIGTERM on.
        forward = signal.SIGTERM if plan.controller == "gloo" else signal.SIGUSR1
        return supervise(line, Path(where), forward=forward)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def supervise(line: Sequence[str], where: Path, *, forward: int = signal.SIGUSR1) -> int:
    """Run the launcher ``line`` whose ranks record how they end in ``where``; the job's status.

    A SIGTERM or SIGUSR1 to us (a time limit, scancel, kill) goes to the launcher once, as
    ``forward``; we stay to the end, since at a time limit the ranks' stop line is ours to print
    (mpirun, signalled too, may not pass it on). Ctrl-C reaches the launcher from the terminal
    itself. The status: 2 if a rank recorded an error (printed here if no rank said it), 0 if
    rank 0 recorded a stop by a signal (the stop line printed here), else the launcher's.
    """
    received: List[int] = []
    started: List[subprocess.Popen] = []

    def on_stop(signum, frame):
        if not received:
            received.append(signum)
            if started:
                _send(started[0], forward)

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        proc = subprocess.Popen(list(line))
        started.append(proc)
        if received:  # a signal between the handlers and the start
            _send(proc, forward)
        rc, said = _wait(proc, where, received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _status(rc, outcome.read(where), received, said)


def _wait(proc: subprocess.Popen, where: Path, received: List[int]) -> Tuple[int, bool]:
    """The launcher's exit status, and whether the stop line was said while it ran."""
    said, error_seen = False, None
    while True:
        try:
            return proc.wait(timeout=_POLL_SECONDS), said
        except subprocess.TimeoutExpired:
            pass
        records = outcome.read(where)
        if not said:
            said = _say_stop(records, received)
        if error_seen is None and any(r.get("kind") == "error" for r in records):
            error_seen = time.monotonic()
        if error_seen is not None and time.monotonic() - error_seen > ERROR_GRACE_SECONDS:
            _send(proc, signal.SIGTERM)
            error_seen = float("inf")


def _say_stop(records: List[dict], received: List[int]) -> bool:
    stop = next((r for r in records if r.get("kind") == "stopped"), None)
    if stop is None:
        return False
    name = signal.Signals(received[0]).name if received else str(stop.get("signal") or "")
    logs.write_line(sys.stdout, "knl-train: " + outcome.stop_message(
        name, int(stop.get("step") or 0), stop.get("checkpoint")))
    return True


def _status(rc: int, records: List[dict], received: List[int], said: bool) -> int:
    errors = [r for r in records if r.get("kind") == "error"]
    if errors:
        if not any(r.get("said") for r in errors):
            logs.write_line(sys.stderr, f"knl-train: error (rank {errors[0]['rank']}): "
                                        f"{errors[0].get('message', '')}")
        return 2
    if said or _say_stop(records, received):
        return 0
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention


def _send(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except (ProcessLookupError, OSError):
        pass
