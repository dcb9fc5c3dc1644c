"""``knl-train launch``: a ``LaunchPlan`` on this host, and the line that runs it.

The line comes from ``launchers``: Open MPI's ``mpirun``, Hydra's (MPICH, Intel MPI), found by
asking ``mpirun --version``, or ``horovodrun --gloo``. With a preset every rank runs under
``knl-train exec``, which applies the rank's share of the plan. Open MPI refuses to run as root
without ``--allow-run-as-root``; we pass that switch only when we are root, and never through
the environment, so it cannot leak into other runs.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from knl_train import log as logs
from knl_train.errors import UserError
from knl_train.runtime.rankenv import LAUNCH_VARS, VAR_PREFIX, RankEnv
from knl_train.tuning import launchers, plan as planning, show
from knl_train.tuning.plan import NodePlan

log = logs.get(__name__)

CONTROLLERS = ("mpi", "gloo")
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
         node: Optional[NodePlan] = None) -> List[str]:
    """The full launcher command line for ``plan`` (``node``: its ``plan.node()``, if made already)."""
    node = plan.node() if node is None else node
    if node is None:
        check_fits(plan)
        exports, command = {}, list(plan.command)
    else:
        ref = planning.preset_ref(plan.preset, node)
        exports = launchers.rank_env(node, ref, oversubscribe=plan.oversubscribe).to_environ()
        command = [*knl_train_exec(), *plan.command]
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


def prepare(plan: LaunchPlan) -> List[str]:
    """``knl-train launch``: plan the node, say what the plan warns of, and give the line."""
    node = plan.node()
    if node is not None:
        show.tell(node)
        if plan.hostfile and plan.preset == "auto":
            log.info(f"note: the preset ({node.preset.name}) and the cores per rank were worked out "
                     "on this host; pass --preset and --ranks-per-node if the nodes in the hostfile "
                     "differ from it")
    return argv(plan, node=node)


def default_progress(environ=None, *, tty: Optional[bool] = None) -> None:
    """Ranks draw a progress bar on a terminal and write lines into a log file, unless told."""
    environ = os.environ if environ is None else environ
    tty = sys.stdout.isatty() if tty is None else tty
    environ.setdefault(RankEnv.var("progress"), "bar" if tty else "lines")


def render(line: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in line)
