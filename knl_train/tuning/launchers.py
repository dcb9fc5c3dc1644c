"""Launcher lines: one small class per launcher, registered by name (``get("srun")``).

Every place that starts ranks asks this registry: ``knl-train env --format NAME`` prints a line
for a node type, ``knl-train launch`` runs one on this host (``launch.py``), and a study's job
scripts carry one (``studies/render.py``). A line passes only which preset and how the node is
split (``rank_env``); each rank plans its own node and binds itself (``runtime.bootstrap``), and
the launcher's own binding agrees with that plan.

We build ``mpirun`` lines ourselves instead of using horovodrun's, which force TCP
(``-mca pml ob1 -mca btl ^openib``) and ``-bind-to none`` (stack_and_cpu_tuning.md §1.5).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from knl_train.errors import UserError
from knl_train.registry import Registry
from knl_train.runtime.rankenv import RankEnv
from knl_train.tuning.plan import NodePlan, cpulist

LAUNCHERS: Registry = Registry("launcher")

SIGKILL_GRACE_SECONDS = 10
# At a time limit the scheduler sends SIGTERM to mpirun as well as to the ranks; mpirun then
# SIGKILLs them after twice odls_base_sigkill_timeout seconds (default 1). The grace lets rank 0
# finish its checkpoint, and stays under Slurm's default KillWait of 30 s.
# Horovod's background thread shares the rank's cores with the compute threads; busy polling
# in MPI steals them from the backward pass (Horovod #2804). Yielding measured 2 ranks x 1 core
# at 0.99 of 2 x 1 rank, against 0.66 polling (bench_trainer.py).
OPENMPI_MCA = ("--mca", "odls_base_sigkill_timeout", str(SIGKILL_GRACE_SECONDS),
               "--mca", "mpi_yield_when_idle", "1")


# ---- what every launcher needs --------------------------------------------------------------------
def rank_env(node: NodePlan, preset_ref: str, *, oversubscribe: bool = False) -> RankEnv:
    """What a launcher line passes to every rank: the preset, and how the node is split."""
    # The cores per rank always go along: launcher and ranks then agree on the runs of cores.
    return RankEnv(preset=preset_ref, ranks_per_node=node.ranks_per_node,
                   cores_per_rank=node.cores_per_rank, oversubscribe=oversubscribe or None)


def hex_mask(cpus: Sequence[int]) -> str:
    """A CPU set as the hex mask srun's mask_cpu and Intel MPI's domains take."""
    return hex(sum(1 << c for c in cpus))


def cpu_masks(node: NodePlan) -> str:
    """One mask per local rank, comma-separated (srun --cpu-bind=mask_cpu:...)."""
    return ",".join(hex_mask(r.cpus) for r in node.ranks)


def pin_domains(node: NodePlan) -> str:
    """Intel MPI's I_MPI_PIN_DOMAIN: one CPU mask per local rank."""
    return "[" + cpu_masks(node) + "]"


def intel_mpi_pinning(node: NodePlan) -> Dict[str, str]:
    """Intel MPI binds through its environment: one domain per local rank (none oversubscribed)."""
    return {} if node.oversubscribed else {"I_MPI_PIN_DOMAIN": pin_domains(node)}


@dataclass(frozen=True)
class Request:
    """What a launcher line starts: ranks laid out by a node plan, and what every rank receives."""
    node: Optional[NodePlan]          # the preset's plan of one node; None: bind only, no preset
    nodes: int = 1
    ranks: int = 0                    # in all; 0: nodes x the plan's ranks per node
    exports: Mapping[str, str] = field(default_factory=dict)  # variables every rank gets
    # A job script exported ``exports`` before the line: the line lets the ranks see them and
    # does not repeat their values.
    exported: bool = False
    # Variables ranks take from the launching shell by name (Open MPI -x, Hydra -genvlist);
    # launchers that pass the whole environment on need no list.
    forward: Tuple[str, ...] = ()
    hostfile: Optional[str] = None
    oversubscribe: bool = False       # allow more ranks x cores than cores: bind nothing
    cores_per_rank: int = 0           # without a node plan: the cores bound to each rank
    program: str = ""                 # the launcher's executable; "": its usual name
    as_root: bool = False             # this process runs as root
    srun_mpi: Optional[str] = None    # Slurm's MPI plugin (srun --mpi=)
    options: Tuple[str, ...] = ()     # a site's own launcher options, after ours

    def __post_init__(self):
        if self.total_ranks < 1:
            raise UserError(f"a launcher line needs at least one rank, got {self.total_ranks}")

    @property
    def total_ranks(self) -> int:
        if self.ranks or self.node is None:
            return self.ranks
        return self.nodes * self.node.ranks_per_node


class Launcher:
    """One launcher; ``command(request)`` gives its tokens, up to the program the ranks run."""
    name = ""                 # set by ``register``
    program = ""              # the executable; "": the registered name
    hostfile_option = ""      # the option naming a host list; "": the scheduler names the hosts

    def command(self, request: Request) -> List[str]:
        raise NotImplementedError

    # Intel MPI (Hydra, ibrun) binds through its environment, not through options.
    binds_by_env = False

    def binding_env(self, node: NodePlan) -> Dict[str, str]:
        """Variables that bind the ranks, for launchers that bind through the environment."""
        return intel_mpi_pinning(node) if self.binds_by_env else {}

    def hosts(self, hostfile: str) -> List[str]:
        """The options that name a host list (a path, or a shell word such as "$PBS_NODEFILE");
        none where the scheduler names the hosts."""
        return [self.hostfile_option, hostfile] if self.hostfile_option else []

    def _start(self, request: Request) -> List[str]:
        """The program; a hostfile is refused where the scheduler names the hosts."""
        if request.hostfile and not self.hostfile_option:
            raise UserError(f"{self.name} takes its hosts from the scheduler, not from a hostfile")
        return [request.program or self.program]

    def _node(self, request: Request) -> NodePlan:
        if request.node is None:
            raise UserError(f"a {self.name} line binds ranks from a preset's plan: give a preset")
        return request.node


def register(name: str):
    """Class decorator: ``get(name)`` answers with an instance of the class."""
    def add(cls):
        cls.name = name
        # Most launchers' executables bear their names; Hydra's (mpiexec.hydra) does not.
        cls.program = cls.program or name
        LAUNCHERS.register(name)(cls)
        return cls
    return add


def names() -> Tuple[str, ...]:
    return LAUNCHERS.names()


def get(name: str) -> Launcher:
    """The launcher registered as ``name``; an unknown name is a UserError listing them all."""
    return LAUNCHERS.lookup(name)()


def _with_env(exports: Mapping[str, str], line: List[str]) -> List[str]:
    """``env K=V ... line``: for launchers that pass their own environment on to the ranks."""
    if not exports:
        return line
    return [shutil.which("env") or "/usr/bin/env", *(f"{k}={v}" for k, v in exports.items()), *line]


# ---- the launchers --------------------------------------------------------------------------------
@register("mpirun")
class OpenMpi(Launcher):
    """Open MPI's mpirun: ppr:R:node:PE=T core binding; -x passes variables to remote ranks."""
    hostfile_option = "--hostfile"

    def command(self, request: Request) -> List[str]:
        line = [*self._start(request), "-np", str(request.total_ranks)]
        if request.as_root:
            # Open MPI refuses root without it; on the line, never through the environment,
            # so that it cannot leak into other runs.
            line.append("--allow-run-as-root")
        if request.hostfile:
            line += self.hosts(request.hostfile)
        node = request.node
        if request.oversubscribe:
            line += ["--oversubscribe", "--bind-to", "none"]
        elif node is not None:
            line += ["--map-by", f"ppr:{node.ranks_per_node}:node:PE={node.cores_per_rank}",
                     "--bind-to", "core"]
        else:
            line += ["--map-by", f"slot:PE={request.cores_per_rank}", "--bind-to", "core"]
        line += OPENMPI_MCA
        # Open MPI forwards only what -x names.
        for k, v in request.exports.items():
            line += ["-x", k if request.exported else f"{k}={v}"]
        for name in request.forward:
            line += ["-x", name]
        return line + list(request.options)


@register("impi")
class Hydra(Launcher):
    """Hydra (Intel MPI, MPICH): -ppn ranks per node; Intel MPI pins by I_MPI_PIN_DOMAIN masks."""
    binds_by_env = True
    program = "mpiexec.hydra"
    hostfile_option = "-f"

    def command(self, request: Request) -> List[str]:
        start = self._start(request)
        # mpirun's traditional -np, mpiexec's standard -n: Hydra takes both.
        count = "-np" if os.path.basename(start[0]) == "mpirun" else "-n"
        line = [*start, count, str(request.total_ranks)]
        if request.hostfile:
            line += self.hosts(request.hostfile)
        # Hydra passes the whole environment unless given a list; a job script's exports need it whole.
        if request.forward and not request.exported:
            line += ["-genvlist", ",".join(request.forward)]
        node = request.node
        if node is not None:
            line += ["-ppn", str(node.ranks_per_node)]
            if not request.exported:
                for k, v in {**self.binding_env(node), **request.exports}.items():
                    line += ["-genv", k, v]
        return line + list(request.options)


@register("srun")
class Srun(Launcher):
    """Slurm's srun: one CPU mask per local rank (--cpu-bind=mask_cpu), block distribution."""

    def command(self, request: Request) -> List[str]:
        node = self._node(request)
        line = [*self._start(request), f"--nodes={request.nodes}", f"--ntasks={request.total_ranks}",
                f"--ntasks-per-node={node.ranks_per_node}",
                # Explicit: srun 22.05-23.02 does not inherit the job's --cpus-per-task.
                f"--cpus-per-task={node.cpus_per_task}", f"--cpu-bind=mask_cpu:{cpu_masks(node)}",
                "--distribution=block:block",
                # One rank's failure ends the step: the others would wait in a collective
                # until the time limit.
                "--kill-on-bad-exit=1"]
        if request.srun_mpi:
            line.append(f"--mpi={request.srun_mpi}")
        values = [] if request.exported else [f"{k}={v}" for k, v in request.exports.items()]
        line.append("--export=" + ",".join(["ALL", *values]))
        return line + list(request.options)


@register("ibrun")
class Ibrun(Launcher):
    """TACC's ibrun: takes the task count from the job; Intel MPI pins by I_MPI_PIN_DOMAIN."""
    binds_by_env = True

    def command(self, request: Request) -> List[str]:
        node = self._node(request)
        line = [*self._start(request), *request.options]
        if request.exported:
            return line
        return _with_env({**self.binding_env(node), **request.exports}, line)


@register("aprun")
class Aprun(Launcher):
    """Cray ALPS aprun: -cc lists each local rank's CPUs, -j hardware threads per core."""

    def command(self, request: Request) -> List[str]:
        node = self._node(request)
        cc = ":".join(cpulist(r.cpus) for r in node.ranks)
        ht = 1 if node.oversubscribed else min(node.settings.threads_per_core,
                                               node.cpus_per_task // max(1, node.cores_per_rank))
        line = [*self._start(request), "-n", str(request.total_ranks), "-N", str(node.ranks_per_node),
                "-d", str(len(node.ranks[0].cpus)), "-j", str(ht), "-cc", cc]
        if not request.exported:
            for k, v in request.exports.items():
                line += ["-e", f"{k}={v}"]
        return line + list(request.options)


@register("horovodrun")
class HorovodrunGloo(Launcher):
    """``horovodrun --gloo``: Horovod's own launcher, without MPI."""
    hostfile_option = "--hostfile"

    def command(self, request: Request) -> List[str]:
        n = request.total_ranks
        line = [*self._start(request), "--gloo", "-np", str(n)]
        if request.hostfile:
            line += self.hosts(request.hostfile)
        elif request.nodes > 1:
            raise UserError(f"horovodrun over {request.nodes} nodes needs a hostfile "
                            "(knl-train launch --controller gloo --hostfile FILE)")
        else:
            line += ["-H", f"localhost:{n}"]
        line += list(request.options)
        # horovodrun passes its own environment on to the ranks.
        return line if request.exported else _with_env(request.exports, line)
