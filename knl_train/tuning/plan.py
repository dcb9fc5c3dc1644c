"""A preset on a node: the cores, threads and environment of every rank on it.

Ranks get contiguous runs of physical cores in the node's logical order (socket by socket),
the order Open MPI's ``--map-by ppr:R:node:PE=T`` and Slurm's block distribution use, so the
launcher's binding and this plan agree. Each rank computes on the first cores of its run and
leaves the last ``spare_cores`` to Horovod's background thread and tf.data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from knl_train.errors import UserError
from knl_train.runtime.rankenv import RankEnv
from knl_train.tuning import preset as presets, topology as topologies
from knl_train.tuning.preset import Preset, Settings
from knl_train.tuning.topology import Topology, format_cpulist


@dataclass(frozen=True)
class RankPlan:
    local_rank: int
    # Bound: the compute threads' CPUs and the spare cores' (so hyperthreads a preset does not
    # compute on stay idle even for stock TF, whose Eigen threads float within the mask).
    cpus: Tuple[int, ...]
    compute_cpus: Tuple[int, ...]  # where the compute threads go, in OpenMP placement order
    spare_cpus: Tuple[int, ...]    # Horovod's background thread and tf.data
    intra_op: int
    inter_op: int
    data_threads: int
    rank_env: RankEnv              # the rank's threading and library variables

    @property
    def env(self) -> Tuple[Tuple[str, str], ...]:
        """``rank_env`` as sorted (variable, value) pairs."""
        return tuple(sorted(self.rank_env.to_environ().items()))

    @property
    def environ(self) -> Dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True)
class NodePlan:
    preset: Preset
    settings: Settings
    ranks_per_node: int
    cores_per_rank: int
    # What a scheduler allocates per rank: whole cores, every hardware thread.
    cpus_per_task: int
    oversubscribed: bool
    ranks: Tuple[RankPlan, ...]
    numactl: Tuple[str, ...]       # the memory-policy prefix, e.g. ("numactl", "--preferred=1")
    warnings: Tuple[str, ...]
    notes: Tuple[str, ...]


def cpulist(cpus: Sequence[int]) -> str:
    """Linux cpulist syntax, order kept: (0, 1, 2, 68, 69) -> '0-2,68-69'."""
    return format_cpulist(cpus, keep_order=True)


def _compute_order(cores: Sequence[Tuple[int, ...]], ht: int) -> Tuple[int, ...]:
    # First hardware thread of every core, then the second ones: OpenMP's compact,1,0 order,
    # so a shorter thread count still lands on distinct cores first.
    return tuple(core[t] for t in range(ht) for core in cores if t < len(core))


def kept_spare_cores(spare: int, cores: int) -> int:
    """Spare cores are kept only while they are at most a fifth of the rank's cores."""
    return spare if spare * 5 <= cores else 0


def plan(preset: Preset, topology, ranks_per_node: Optional[int] = None, *,
         cores_per_rank: int = 0, oversubscribe: bool = False) -> NodePlan:
    """Lay ``ranks_per_node`` ranks (default: the preset's) onto ``topology``'s allowed cores."""
    cores = topology.cores()
    if not cores:
        raise UserError("this process may use no CPU of the node (empty affinity/cpuset)")
    R = ranks_per_node or preset.default_ranks(topology.sockets)
    if R < 1:
        raise UserError(f"--ranks-per-node must be >= 1, got {R}")
    settings = preset.settings_for(R, topology.sockets)
    warnings, notes = [], []
    if not preset.matches(topology):
        warnings.append(f"preset {preset.name} ({preset.title}) does not match this CPU: "
                        f"{topology.model_name} (detected preset: {presets.detect(topology).name})")
    if settings.itex and topology.is_knl:
        raise UserError(f"preset {preset.name} turns ITEX on, but this is a Xeon Phi: ITEX's "
                        "AVX-512 library is built for Skylake and dies with SIGILL here; set "
                        "itex: false")
    if cores_per_rank < 0:
        raise UserError(f"--threads-per-rank must be >= 1 (or 0: cores / ranks), got {cores_per_rank}")
    n = len(cores)
    T = cores_per_rank or max(1, n // R)
    oversubscribed = R * T > n
    if oversubscribed and not oversubscribe:
        need = (f"{R} ranks x {T} cores need {R * T} cores, but this node lets us use {n} "
                f"(CPUs {cpulist(sorted(topology.allowed))})")
        if not preset.matches(topology) and preset.node is not None:
            # A preset for another CPU: its ranks fit the node it was written for, not this one.
            raise UserError(
                f"{need}: preset {preset.name} is written for {preset.node.model_name} "
                f"({preset.node.sockets * preset.node.cores_per_socket} cores), not this "
                f"{topology.model_name}. To see its plan for that node, pass --topology nominal "
                f"(knl-train env --preset {preset.name} --topology nominal); to run it, launch on "
                "such a node, or pick this node's preset (knl-train topology names it).")
        raise UserError(
            f"{need}. Use fewer ranks per node or threads per rank, or pass --oversubscribe to "
            "share cores (for testing only: slower, unbound).")
    ht = min(settings.threads_per_core, topology.threads_per_core)
    ranks = []
    for r in range(R):
        if oversubscribed:
            mine = tuple(cores[(r * T + i) % n] for i in range(T))
        else:
            mine = cores[r * T:(r + 1) * T]
        spare = 0 if oversubscribed else kept_spare_cores(settings.spare_cores, len(mine))
        compute, spares = mine[:len(mine) - spare], mine[len(mine) - spare:]
        compute_cpus = _compute_order(compute, ht)
        spare_cpus = tuple(sorted(c for core in spares for c in core))
        bound = (tuple(sorted(c for core in mine for c in core)) if oversubscribed
                 else tuple(sorted(compute_cpus + spare_cpus)))
        ranks.append((r, bound, compute_cpus, spare_cpus))
        sockets = {topology.socket_of(core[0]) for core in mine}
        if len(sockets) > 1 and not oversubscribed:
            warnings.append(f"local rank {r} spans sockets {sorted(sockets)}: use a multiple of "
                            f"{topology.sockets} ranks per node so that no rank crosses sockets")
    if n % R and not cores_per_rank and not oversubscribed:
        notes.append(f"{n % R} of {n} cores are left idle: {n} cores do not divide by {R} ranks")

    # Horovod's background thread: one CPU per local rank, listed for all of them, since Horovod
    # picks entry [local_rank] and ignores the variable unless it has local_size entries.
    hvd_affinity = (",".join(str(s[0]) for _, _, _, s in ranks)
                    if all(s for _, _, _, s in ranks) else None)
    node_env = RankEnv(
        onednn=settings.onednn, itex=settings.itex, kmp_blocktime=str(settings.kmp_blocktime),
        fusion_threshold_bytes=int(settings.fusion_threshold_mb * 1024 * 1024),
        cycle_time_ms=float(settings.cycle_time_ms), data_threads=settings.data_threads,
        horovod_thread_affinity=hvd_affinity,
        kmp_hw_subset=f"{ht}t" if topology.threads_per_core > 1 else None)

    out = []
    for r, cpus, compute_cpus, spare_cpus in ranks:
        intra = settings.intra_op or len(compute_cpus)
        env = node_env.replace(intra_op=intra, inter_op=settings.inter_op, omp_threads=intra)
        if not oversubscribed:
            if settings.affinity == "kmp":
                env = env.replace(kmp_affinity=f"granularity=fine,proclist=[{cpulist(compute_cpus)}],explicit")
            else:
                env = env.replace(omp_places=",".join(f"{{{c}}}" for c in compute_cpus),
                                  omp_proc_bind="close")
        out.append(RankPlan(r, cpus, compute_cpus, spare_cpus, intra, settings.inter_op,
                            settings.data_threads, env))

    numactl: Tuple[str, ...] = ()
    if settings.memory == "mcdram":
        if len(topology.mcdram_nodes) == 1:
            numactl = ("numactl", f"--preferred={topology.mcdram_nodes[0]}")
        elif topology.mcdram_nodes:
            warnings.append(f"{len(topology.mcdram_nodes)} MCDRAM nodes (SNC flat mode): each rank "
                            "needs the one of its own quadrant, which presets do not plan; no "
                            "memory policy is set")
        elif topology.is_knl:
            notes.append("MCDRAM is in cache mode here (no CPU-less NUMA node): nothing to bind")
    return NodePlan(preset, settings, R, T, T * topology.threads_per_core, oversubscribed,
                    tuple(out), numactl,
                    tuple(warnings), tuple(notes))


def node_plan(preset_ref: str, ranks_per_node: int = 0, *, cores_per_rank: int = 0,
              oversubscribe: bool = False, topology: Optional[Topology] = None) -> NodePlan:
    """``plan`` for a preset name, file or "auto" (chosen from the CPU) on ``topology`` (default:
    this node)."""
    topology = topologies.detect() if topology is None else topology
    chosen = presets.detect(topology) if preset_ref == "auto" else presets.load(preset_ref)
    return plan(chosen, topology, ranks_per_node or None,
                cores_per_rank=cores_per_rank, oversubscribe=oversubscribe)


def preset_ref(arg: str, node: NodePlan) -> str:
    """What ranks are told: the preset's name ("auto" resolved, so a line says which preset
    every rank applies), or a preset file's absolute path (ranks may start elsewhere)."""
    if arg == "auto" or arg in presets.names():
        return node.preset.name
    return os.path.abspath(arg)
