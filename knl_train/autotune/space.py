"""What the autotuner searches: the node (``Machine``), the timed run (``Workload``), the values
per dimension (``Space``), one setting (``Candidate``) and that setting as its ranks run it
(``Effective``). TensorFlow-free: the CLI builds these before anything is measured."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import Optional, Tuple

from knl_train.errors import UserError
from knl_train.runtime import itex
from knl_train.tuning import topology as topo
from knl_train.tuning.plan import kept_spare_cores
from knl_train.tuning.preset import Settings

# KMP_BLOCKTIME that candidates carry until the blocktime dimension changes it (the presets').
START_BLOCKTIME = 1


@dataclass(frozen=True)
class Machine:
    """What the search needs to know of the node."""
    cores: int                       # physical cores this job may use
    sockets: int = 1
    threads_per_core: int = 1
    itex: str = "absent"             # absent | optional (KNL_TRAIN_ITEX=1) | always (site-packages)
    is_knl: bool = False
    host: str = ""
    cpu: str = ""
    isa: Tuple[str, ...] = ()


def detect_machine(topology=None) -> Machine:
    t = topo.detect() if topology is None else topology
    cores = t.cores()
    if not cores:
        raise UserError("this process may use no CPU of the node (empty affinity/cpuset)")
    state = ("always" if itex.site_version() else
             "optional" if itex.side_version() else "absent")
    return Machine(cores=len(cores), sockets=max(1, t.sockets),
                   threads_per_core=max(len(c) for c in cores), itex=state, is_knl=t.is_knl,
                   host=socket.gethostname(), cpu=t.model_name, isa=tuple(t.isa))


@dataclass(frozen=True)
class Workload:
    """The synthetic training run every trial times."""
    model: str = "resnet50"
    image_size: int = 224
    batch: int = 32              # images per node and step, split over the node's ranks
    classes: int = 1000
    warmup: int = 3
    steps: int = 10


@dataclass(frozen=True)
class Space:
    """Values to try per dimension; () = chosen for the machine (see ``resolved``)."""
    precision: Tuple[str, ...] = ("fp32",)
    onednn: Tuple[bool, ...] = (True, False)
    itex: Tuple[bool, ...] = (False, True)
    ranks: Tuple[int, ...] = ()
    spare_cores: Tuple[int, ...] = (0, 1)
    threads_per_core: Tuple[int, ...] = ()
    intra_op: Tuple[int, ...] = (0,)
    inter_op: Tuple[int, ...] = (1, 2)
    blocktime: Tuple[int, ...] = (0, 1, 200)

    def resolved(self, machine: Machine) -> "Space":
        ranks = self.ranks or tuple(sorted({1, 2, 4, machine.sockets, 2 * machine.sockets}))
        tpc = self.threads_per_core or tuple(range(1, machine.threads_per_core + 1))
        return dataclasses.replace(self, ranks=ranks, threads_per_core=tpc)


@dataclass(frozen=True)
class Candidate:
    """One setting. Zeros mean what TF would do: every hardware thread, TF's pool sizes."""
    precision: str = "fp32"
    onednn: bool = True
    itex: bool = False
    ranks: int = 1
    spare_cores: int = 0
    threads_per_core: int = 0
    intra_op: int = 0            # 0: one per compute hardware thread
    inter_op: int = 0            # 0: TF's default (one per CPU of the rank)
    blocktime: int = START_BLOCKTIME
    baseline: bool = False       # TF's defaults: launched with no preset, no settings at all


def baseline(machine: Machine) -> Candidate:
    return Candidate(itex=machine.itex == "always", baseline=True)


@dataclass(frozen=True)
class Effective:
    """A candidate as its ranks run it."""
    precision: str
    onednn: bool
    itex: bool
    ranks: int
    cores_per_rank: int
    spare_cores: int
    threads_per_core: int
    intra_op: int
    inter_op: int
    blocktime: Optional[int]     # None without ITEX: nothing reads it


def effective(c: Candidate, m: Machine) -> Effective:
    cpr = max(1, m.cores // c.ranks)
    tpc = min(c.threads_per_core or m.threads_per_core, m.threads_per_core)
    # The planner keeps spare cores only while they are at most a fifth of the rank's cores.
    spare = kept_spare_cores(c.spare_cores, cpr)
    return Effective(c.precision, c.onednn, c.itex, c.ranks, cpr, spare, tpc,
                     c.intra_op or (cpr - spare) * tpc, c.inter_op or cpr * m.threads_per_core,
                     c.blocktime if c.itex else None)


def infeasible(dim: str, c: Candidate, m: Machine, batch: int) -> Optional[str]:
    """Why ``c`` cannot run here (judged on dimension ``dim``), or None."""
    if dim == "ranks":
        if m.cores % c.ranks:
            return f"{c.ranks} ranks do not divide the {m.cores} cores"
        if batch % c.ranks:
            return f"the batch of {batch} images does not split evenly over {c.ranks} ranks"
    if dim == "threads_per_core" and c.threads_per_core > m.threads_per_core:
        return f"the cores have {m.threads_per_core} hardware thread(s)"
    if dim == "spare_cores" and c.spare_cores and not kept_spare_cores(c.spare_cores, m.cores // c.ranks):
        return (f"{c.spare_cores} spare core(s) exceed a fifth of a rank's {m.cores // c.ranks} "
                "cores, so the planner would not keep them")
    if dim == "itex" and c.itex:
        if m.is_knl:
            return "ITEX's AVX-512 library dies with SIGILL on Xeon Phi"
        if m.itex == "absent":
            return "ITEX is not installed (make env installs it beside the environment)"
    if dim == "itex" and not c.itex and m.itex == "always":
        return "ITEX is installed in site-packages, so it is always on"
    return None


def label(c: Candidate, m: Machine) -> str:
    """What differs, as run, from TF's defaults at the same ranks, e.g. 'bf16, ITEX, 2 ranks'."""
    if c.baseline:
        return "TF defaults" + (" (ITEX always on)" if c.itex else "")
    e = effective(c, m)
    parts = []
    if c.precision != "fp32":
        parts.append("bf16" if c.precision == "mixed_bf16" else c.precision)
    if not c.onednn:
        parts.append("oneDNN off")
    if c.itex and m.itex != "always":
        parts.append("ITEX")
    if c.ranks != 1:
        parts.append(f"{c.ranks} ranks")
    if e.spare_cores:
        parts.append(f"{e.spare_cores} spare core{'s' if e.spare_cores > 1 else ''}")
    if e.threads_per_core != m.threads_per_core:
        parts.append(f"{e.threads_per_core} thread{'s' if e.threads_per_core > 1 else ''}/core")
    if e.intra_op != (e.cores_per_rank - e.spare_cores) * e.threads_per_core:
        parts.append(f"intra-op {e.intra_op}")
    if e.inter_op != e.cores_per_rank * m.threads_per_core:
        parts.append(f"inter-op {e.inter_op}")
    if c.itex and c.blocktime != START_BLOCKTIME:
        parts.append(f"blocktime {c.blocktime}")
    return ", ".join(parts) or "TF defaults as a preset"


def settings_for(c: Candidate, machine: Machine, base: Settings = Settings()) -> Settings:
    """The preset settings that run ``c`` (fields the search does not touch come from ``base``)."""
    e = effective(c, machine)
    return dataclasses.replace(base, spare_cores=c.spare_cores, threads_per_core=e.threads_per_core,
                               intra_op=c.intra_op, inter_op=e.inter_op, kmp_blocktime=c.blocktime,
                               itex=c.itex, onednn=c.onednn)
