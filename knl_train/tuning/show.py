"""``knl-train env``: a node plan as shell exports (one rank), a launcher line, or JSON.

A launcher line carries only which preset and how many ranks per node (``launchers.rank_env``),
so it does not grow with the ranks; each rank then plans its node itself (``runtime.bootstrap``).
``sh`` prints one rank's settings for a shell, ``json`` the whole plan, and every registered
launcher's name (``launchers.names()``) its line.
"""

from __future__ import annotations

import json
import shlex
from typing import Optional, Sequence

from knl_train import log as logs
from knl_train.errors import UserError
from knl_train.tuning import launchers, plan as planning, preset as presets, snapshot
from knl_train.tuning import topology as topologies
from knl_train.tuning.plan import NodePlan, cpulist
from knl_train.tuning.topology import Topology

log = logs.get(__name__)

FORMATS = ("sh", "json", *launchers.names())
EXEC_PREFIX = ("knl-train", "exec", "--")


def env(preset_ref: str = "auto", fmt: str = "sh", *, ranks_per_node: int = 0, cores_per_rank: int = 0,
        oversubscribe: bool = False, topology: str = "detect", nodes: int = 1, local_rank: int = 0,
        command: Sequence[str] = ()) -> str:
    """``knl-train env``: plan ``preset_ref`` on a node (``topology``: detect, nominal or a
    snapshot file) and show it as ``fmt``; a launcher format logs the plan's warnings and notes."""
    topo = choose_topology(topology, preset_ref)
    node = planning.node_plan(preset_ref, ranks_per_node, cores_per_rank=cores_per_rank,
                              oversubscribe=oversubscribe, topology=topo)
    if fmt != "sh":  # sh prints them as comments
        tell(node)
    return text(node, fmt, preset_ref=planning.preset_ref(preset_ref, node), nodes=nodes,
                rank=local_rank, command=command, oversubscribe=oversubscribe, topology=topo)


def choose_topology(choice: str, preset_ref: str) -> Topology:
    """detect (this node), nominal (the node the preset was written for) or a snapshot file."""
    if choice == "detect":
        return topologies.detect()
    if choice == "nominal":
        if preset_ref == "auto":
            raise UserError("--topology nominal needs a named --preset: the node it was written for")
        return presets.nominal_topology(preset_ref, hint="use --topology detect or a snapshot file")
    return snapshot.load(choice)


def tell(node: NodePlan) -> None:
    """The plan's warnings and notes, as log lines."""
    for w in node.warnings:
        log.warning(w)
    for n in node.notes:
        log.info(f"note: {n}")


def text(node: NodePlan, fmt: str, *, preset_ref: str, nodes: int = 1, rank: int = 0,
         command: Sequence[str] = (), exec_prefix: Sequence[str] = EXEC_PREFIX,
         oversubscribe: bool = False, topology: Optional[Topology] = None) -> str:
    """The plan as shell exports (one rank), a launcher line, or JSON."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not 0 <= rank < node.ranks_per_node:
        raise UserError(f"--local-rank {rank} is out of range: the plan has "
                        f"{node.ranks_per_node} ranks per node (0-{node.ranks_per_node - 1})")
    exports = launchers.rank_env(node, preset_ref, oversubscribe=oversubscribe).to_environ()
    if fmt == "json":
        return json.dumps(as_json(node, preset_ref, nodes, topology, exports), indent=2)
    if fmt == "sh":
        return sh(node, rank, topology)
    request = launchers.Request(node, nodes=nodes, exports=exports, oversubscribe=oversubscribe)
    line = [*launchers.get(fmt).command(request), *exec_prefix, *command]
    return " ".join(shlex.quote(a) for a in line)


def sh(node: NodePlan, rank: int = 0, topology: Optional[Topology] = None) -> str:
    """Local rank ``rank``'s settings as shell exports, the plan's warnings and notes as comments."""
    me = node.ranks[rank]
    out = [f"# knl-train env: preset {node.preset.name} ({node.preset.title})",
           f"# local rank {rank} of {node.ranks_per_node} per node: CPUs {cpulist(me.cpus)}; compute "
           f"{cpulist(me.compute_cpus)}; spare {cpulist(me.spare_cpus) or 'none'}"]
    if topology is not None:
        out.insert(1, f"# node: {topology.describe()}")
    out += [f"# warning: {w}" for w in node.warnings]
    out += [f"# note: {n}" for n in node.notes]
    if node.numactl:
        out.append(f"# memory: run the command under: {' '.join(node.numactl)}")
    out += [f"export {k}={shlex.quote(v)}" for k, v in me.env]
    return "\n".join(out)


def as_json(node: NodePlan, preset_ref: str, nodes: int, topology: Optional[Topology], exports) -> dict:
    """The whole plan, every rank's settings included."""
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
        "exports": dict(exports),
        "warnings": list(node.warnings),
        "notes": list(node.notes),
        "ranks": [{"local_rank": r.local_rank, "cpus": list(r.cpus),
                   "compute_cpus": list(r.compute_cpus), "spare_cpus": list(r.spare_cpus),
                   "intra_op": r.intra_op, "inter_op": r.inter_op,
                   "data_threads": r.data_threads, "env": dict(r.env)} for r in node.ranks],
    }
