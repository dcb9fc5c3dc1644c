"""Launcher lines: ``mpirun`` (Open MPI, MPICH/Intel MPI Hydra) or ``horovodrun --gloo``.

We build ``mpirun`` lines ourselves instead of using horovodrun's, which force TCP
(``-mca pml ob1 -mca btl ^openib``) and ``-bind-to none`` (stack_and_cpu_tuning.md §1.5).
Open MPI refuses to run as root without ``--allow-run-as-root``; we pass that switch only
when we are root, and never through the environment, so it cannot leak into other runs.
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

from knl_train.errors import UserError
from knl_train.runtime.rankenv import LAUNCH_VARS

CONTROLLERS = ("mpi", "gloo")
# Forwarded to remote ranks with -x (local ranks inherit the environment anyway).
FORWARD_PREFIXES = ("TF_", "HOROVOD_", "OMP_", "KMP_", "KNL_TRAIN_", "ITEX_", "ONEDNN_", "DNNL_")
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


SIGKILL_GRACE_SECONDS = 10


def node_plan(plan: LaunchPlan, topology=None):
    """The preset's plan for one node of this launch, or None without a preset."""
    if plan.preset is None:
        return None
    from knl_train.tuning import env
    ranks = plan.ranks_per_node or (0 if plan.hostfile else plan.np)
    return env.node_plan(plan.preset, ranks, cores_per_rank=plan.threads_per_rank,
                         oversubscribe=plan.oversubscribe, topology=topology)


def exports(plan: LaunchPlan, node) -> dict:
    """What every rank needs to find its own settings (see ``env.apply``)."""
    if node is None:
        return {}
    from knl_train.tuning import env
    ref = env.preset_ref(plan.preset, node)
    return env.exports(node, ref, plan.oversubscribe)


def openmpi_options(ranks_per_node: int, cores_per_rank: int, oversubscribe: bool,
                    exports: dict) -> List[str]:
    """Open MPI's binding, signal and polling settings and the preset's exports, for a preset."""
    if oversubscribe:
        line = ["--oversubscribe", "--bind-to", "none"]
    else:
        line = ["--map-by", f"ppr:{ranks_per_node}:node:PE={cores_per_rank}", "--bind-to", "core"]
    line += _OPENMPI_MCA
    for k, v in exports.items():
        line += ["-x", f"{k}={v}"]
    return line


def hydra_options(node, exports: dict) -> List[str]:
    """Hydra's ranks per node and, for Intel MPI, one pinning domain per local rank."""
    from knl_train.tuning import env
    line = ["-ppn", str(node.ranks_per_node)]
    if not node.oversubscribed:
        line += ["-genv", "I_MPI_PIN_DOMAIN", env.pin_domains(node)]
    for k, v in exports.items():
        line += ["-genv", k, v]
    return line


# At a time limit the scheduler sends SIGTERM to mpirun as well as to the ranks; mpirun then
# SIGKILLs them after twice odls_base_sigkill_timeout seconds (default 1). The grace lets rank 0
# finish its checkpoint, and stays under Slurm's default KillWait of 30 s.
# Horovod's background thread shares the rank's cores with the compute threads; busy polling
# in MPI steals them from the backward pass (Horovod #2804). Yielding measured 2 ranks x 1 core
# at 0.99 of 2 x 1 rank, against 0.66 polling (bench_trainer.py).
_OPENMPI_MCA = ["--mca", "odls_base_sigkill_timeout", str(SIGKILL_GRACE_SECONDS),
                "--mca", "mpi_yield_when_idle", "1"]


def knl_train_exec() -> List[str]:
    """``knl-train exec --`` of the Python running us (an unactivated venv is not on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "knl-train")
    if os.access(beside, os.X_OK):
        return [beside, "exec", "--"]
    return [sys.executable, "-m", "knl_train.cli", "exec", "--"]


def argv(plan: LaunchPlan, *, is_root: Optional[bool] = None, environ=None, node=None) -> List[str]:
    """The full launcher command line for ``plan`` (``node``: its ``node_plan``, if made already)."""
    node = node_plan(plan) if node is None else node
    if node is None:
        check_fits(plan)
    xs = exports(plan, node)
    command = list(plan.command) if node is None else [*knl_train_exec(), *plan.command]
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    if plan.controller == "gloo":
        # The horovodrun of the Python running us (an unactivated venv is not on PATH).
        beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        hvdrun = beside if os.access(beside, os.X_OK) else shutil.which("horovodrun")
        if not hvdrun:
            raise UserError("horovodrun is not on PATH; run 'make env' or activate .venv")
        line = [hvdrun, "--gloo", "-np", str(plan.np)]
        line += ["--hostfile", plan.hostfile] if plan.hostfile else ["-H", f"localhost:{plan.np}"]
        # horovodrun passes its own environment on to the ranks.
        if xs:
            line = [shutil.which("env") or "/usr/bin/env", *(f"{k}={v}" for k, v in xs.items()), *line]
        return line + command

    mpirun = shutil.which("mpirun")
    if not mpirun:
        raise UserError("mpirun is not on PATH: load your site's MPI module (module load openmpi) "
                        "or run 'make env', which installs Open MPI on Debian/Ubuntu")
    flavour = mpi_flavour(mpirun)
    line = [mpirun, "-np", str(plan.np)]
    if flavour == "openmpi":
        if is_root:
            line.append("--allow-run-as-root")
        if plan.hostfile:
            line += ["--hostfile", plan.hostfile]
        if node is not None:
            line += openmpi_options(node.ranks_per_node, node.cores_per_rank, plan.oversubscribe, xs)
        else:
            line += (["--oversubscribe", "--bind-to", "none"] if plan.oversubscribe
                     else ["--map-by", f"slot:PE={_threads(plan)}", "--bind-to", "core"])
            line += _OPENMPI_MCA
        for name in forwarded_env(environ):
            line += ["-x", name]
    else:
        # Hydra: binding comes from I_MPI_PIN_* / -bind-to, environment from -genvlist.
        if plan.hostfile:
            line += ["-f", plan.hostfile]
        names = forwarded_env(environ)
        if names:
            line += ["-genvlist", ",".join(names)]
        if node is not None:
            line += hydra_options(node, xs)
    return line + command


def render(line: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in line)
