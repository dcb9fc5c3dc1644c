"""Apply a rank's preset to this process before TensorFlow is imported (every ``knl-train``
command that trains does, and ``knl-train exec -- COMMAND`` does it for any command).

The launcher passes only the preset and the node split (``RankEnv``'s launch fields); the rank
finds its local rank, plans its node, and sets its own environment, affinity and memory policy.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence, Tuple

from knl_train import log as logs
from knl_train.errors import UserError
from knl_train.runtime import itex
from knl_train.runtime.rankenv import THREADING_VARS, RankEnv, local_rank
from knl_train.tuning.plan import NodePlan, RankPlan, cpulist, node_plan

log = logs.get(__name__)


def apply(environ=None, *, via_exec: bool = False) -> Optional[Tuple[NodePlan, RankPlan]]:
    """Apply this rank's settings if a launcher asked for a preset: (node plan, rank plan) or None.

    Sets the environment (the preset wins over inherited values, with a note), the CPU affinity
    when the launcher did not bind or bound elsewhere, and turns ITEX on if asked. Must run
    before TensorFlow is imported; running it twice is harmless.
    """
    environ = os.environ if environ is None else environ
    asked = RankEnv.from_environ(environ, ("preset", "applied"))
    if not asked.preset or asked.applied:
        return None
    asked = RankEnv.from_environ(environ, ("preset", "ranks_per_node", "cores_per_rank", "oversubscribe"))
    node = node_plan(asked.preset, asked.ranks_per_node or 0, cores_per_rank=asked.cores_per_rank or 0,
                     oversubscribe=bool(asked.oversubscribe))
    me = local_rank(node.ranks_per_node, environ)
    if me >= node.ranks_per_node:
        raise UserError(f"local rank {me} but the plan has {node.ranks_per_node} ranks per node: "
                        f"start at most {node.ranks_per_node} ranks per node, or raise {RankEnv.var('ranks_per_node')}")
    rank = node.ranks[me]
    for w in node.warnings:
        _say(me, w, warning=True)
    overridden = [f"{k}={environ[k]} (now {v})" for k, v in rank.env
                  if k in environ and environ[k] != v]
    if overridden:
        _say(me, f"note: preset {node.preset.name} overrides {', '.join(overridden)}")
    planned = rank.environ
    for name in THREADING_VARS:
        if name in environ and name not in planned:
            del environ[name]
    environ.update(planned)
    if node.numactl and not via_exec:
        _say(me, f"the preset's memory policy ({' '.join(node.numactl)}) is applied only by "
             "'knl-train exec -- COMMAND' (knl-train launch uses it); this run has none", warning=True)
    if not node.oversubscribed:
        _bind(rank)
    environ.update(RankEnv(applied=True).to_environ())
    return node, rank


def _bind(rank: RankPlan) -> None:
    current = os.sched_getaffinity(0)
    if current == set(rank.cpus):
        return
    # A launcher binds whole cores; narrowing to the planned hardware threads is expected.
    if not current >= set(rank.cpus):
        _say(rank.local_rank, f"the launcher bound local rank {rank.local_rank} to CPUs "
             f"{cpulist(sorted(current))}; the preset binds it to {cpulist(rank.cpus)}", warning=True)
    try:
        os.sched_setaffinity(0, rank.cpus)
    except OSError as e:
        raise UserError(f"cannot bind local rank {rank.local_rank} to CPUs {cpulist(rank.cpus)} "
                        f"({e}); is the job allowed to use them?") from None


def _say(local: int, msg: str, *, warning: bool = False) -> None:
    """A line from every node's local rank 0 (the nodes may differ), from no other rank."""
    if local == 0:
        (log.warning if warning else log.info)(msg, extra=logs.EVERY_RANK)


def exec_command(command: Sequence[str]) -> None:
    """``knl-train exec -- CMD``: apply this rank's settings, then become CMD."""
    if not command:
        raise UserError("nothing to run: knl-train exec -- COMMAND ...")
    applied = apply(via_exec=True)
    if itex.requested():
        itex.enable()
    argv = list(command)
    if applied and applied[0].numactl:
        if not shutil.which("numactl"):
            raise UserError(f"the preset's memory policy needs numactl ({' '.join(applied[0].numactl)}); "
                            "install it (apt-get install numactl) or load its module")
        argv = [*applied[0].numactl, *argv]
    if not shutil.which(argv[0]):
        raise UserError(f"{argv[0]}: command not found")
    os.execvp(argv[0], argv)
