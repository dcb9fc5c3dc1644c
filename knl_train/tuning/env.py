"""A rank's preset settings: worked out in the rank, applied before TensorFlow is imported.

A launcher line carries only which preset and how many ranks per node
(``KNL_TRAIN_PRESET``, ``KNL_TRAIN_RANKS_PER_NODE``), so it does not grow with the ranks. Each
rank finds its local rank from its launcher's variable, plans its node with ``plan.plan``, and
sets its own environment and affinity (``knl-train exec`` and every ``knl-train`` command do
this). ``lines`` prints the same settings for a shell, mpirun, srun, aprun or Intel MPI.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple

from knl_train.runtime.rankenv import RankEnv
from knl_train.errors import UserError
from knl_train.tuning import plan as planning
from knl_train.tuning.plan import NodePlan, RankPlan, cpulist

FORMATS = ("sh", "mpirun", "srun", "aprun", "impi", "json")


def node_plan(preset_ref: str, ranks_per_node: int = 0, *, cores_per_rank: int = 0,
              oversubscribe: bool = False, topology=None) -> NodePlan:
    from knl_train.tuning import preset as presets, topology as topo
    topology = topo.detect() if topology is None else topology
    chosen = presets.detect(topology) if preset_ref == "auto" else presets.load(preset_ref)
    return planning.plan(chosen, topology, ranks_per_node or None,
                         cores_per_rank=cores_per_rank, oversubscribe=oversubscribe)


# ---- printing ----------------------------------------------------------------------------------
def exports(node: NodePlan, preset_ref: str, oversubscribe: bool = False) -> Dict[str, str]:
    """What a launcher line passes to every rank."""
    # The cores per rank always go along: launcher and ranks then agree on the runs of cores.
    return RankEnv(preset=preset_ref, ranks_per_node=node.ranks_per_node,
                   cores_per_rank=node.cores_per_rank, oversubscribe=oversubscribe or None).to_environ()


def preset_ref(arg: str, node: NodePlan) -> str:
    """What ranks are told: the preset's name ("auto" resolved, so a line says which preset
    every rank applies), or a preset file's absolute path (ranks may start elsewhere)."""
    from knl_train.tuning import preset
    if arg == "auto" or arg in preset.names():
        return node.preset.name
    return os.path.abspath(arg)


def hex_mask(cpus: Sequence[int]) -> str:
    """A CPU set as the hex mask srun's mask_cpu and Intel MPI's domains take."""
    return hex(sum(1 << c for c in cpus))


def cpu_masks(node: NodePlan) -> str:
    """One mask per local rank, comma-separated (srun --cpu-bind=mask_cpu:...)."""
    return ",".join(hex_mask(r.cpus) for r in node.ranks)


def lines(node: NodePlan, fmt: str, *, preset_ref: str, nodes: int = 1, rank: int = 0,
          command: Sequence[str] = (), exec_prefix: Sequence[str] = ("knl-train", "exec", "--"),
          oversubscribe: bool = False, topology=None) -> str:
    """The plan as shell exports (one rank), a launcher line, or JSON."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not 0 <= rank < node.ranks_per_node:
        raise UserError(f"--local-rank {rank} is out of range: the plan has "
                        f"{node.ranks_per_node} ranks per node (0-{node.ranks_per_node - 1})")
    q = shlex.quote
    R, T = node.ranks_per_node, node.cores_per_rank
    np_total = nodes * R
    xs = exports(node, preset_ref, oversubscribe)
    tail = " ".join(q(a) for a in (*exec_prefix, *command))
    if fmt == "json":
        return json.dumps(_as_json(node, preset_ref, nodes, topology, xs), indent=2)
    if fmt == "sh":
        me = node.ranks[rank]
        out = [f"# knl-train env: preset {node.preset.name} ({node.preset.title})",
               f"# local rank {rank} of {R} per node: CPUs {cpulist(me.cpus)}; compute "
               f"{cpulist(me.compute_cpus)}; spare {cpulist(me.spare_cpus) or 'none'}"]
        if topology is not None:
            out.insert(1, f"# node: {topology.describe()}")
        out += [f"# warning: {w}" for w in node.warnings]
        out += [f"# note: {n}" for n in node.notes]
        if node.numactl:
            out.append(f"# memory: run the command under: {' '.join(node.numactl)}")
        out += [f"export {k}={q(v)}" for k, v in me.env]
        return "\n".join(out)
    from knl_train.tuning import launch
    if fmt == "mpirun":
        args = ["mpirun", "-np", str(np_total), *launch.openmpi_options(R, T, oversubscribe, xs)]
        return " ".join(q(a) for a in args) + " " + tail
    if fmt == "srun":
        masks = cpu_masks(node)
        export = ",".join(["ALL", *(f"{k}={v}" for k, v in xs.items())])
        args = ["srun", f"--nodes={nodes}", f"--ntasks={np_total}", f"--ntasks-per-node={R}",
                f"--cpus-per-task={node.cpus_per_task}", f"--cpu-bind=mask_cpu:{masks}",
                "--distribution=block:block", f"--export={export}"]
        return " ".join(q(a) for a in args) + " " + tail
    if fmt == "aprun":
        cc = ":".join(cpulist(r.cpus) for r in node.ranks)
        ht = 1 if node.oversubscribed else min(node.settings.threads_per_core,
                                               node.cpus_per_task // max(1, T))
        args = ["aprun", "-n", str(np_total), "-N", str(R), "-d", str(len(node.ranks[0].cpus)),
                "-j", str(ht), "-cc", cc]
        for k, v in xs.items():
            args += ["-e", f"{k}={v}"]
        return " ".join(q(a) for a in args) + " " + tail
    args = ["mpiexec.hydra", "-n", str(np_total), *launch.hydra_options(node, xs)]
    return " ".join(q(a) for a in args) + " " + tail


def pin_domains(node: NodePlan) -> str:
    """Intel MPI's I_MPI_PIN_DOMAIN: one CPU mask per local rank."""
    return "[" + cpu_masks(node) + "]"


def _as_json(node: NodePlan, preset_ref: str, nodes: int, topology, xs) -> dict:
    return {
        "preset": node.preset.name,
        "preset_ref": preset_ref,
        "title": node.preset.title,
        "node": topology.describe() if topology is not None else None,
        "nodes": nodes,
        "ranks_per_node": node.ranks_per_node,
        "cores_per_rank": node.cores_per_rank,
        "cpus_per_task": node.cpus_per_task,
        "oversubscribed": node.oversubscribed,
        "numactl": list(node.numactl),
        "exports": xs,
        "warnings": list(node.warnings),
        "notes": list(node.notes),
        "ranks": [{"local_rank": r.local_rank, "cpus": list(r.cpus),
                   "compute_cpus": list(r.compute_cpus), "spare_cpus": list(r.spare_cpus),
                   "intra_op": r.intra_op, "inter_op": r.inter_op,
                   "data_threads": r.data_threads, "env": dict(r.env)} for r in node.ranks],
    }
