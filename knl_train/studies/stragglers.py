"""Stragglers: the ranks, and their nodes, that a run's other ranks waited for.

In lock-step data parallel training every rank's step takes the slowest rank's time, so the
wall step time cannot show a straggler. The trainer gathers each rank's busy time per step (its
step time less its wait in the gradient allreduce) at the guard's agreements, and each epoch
record of ``metrics.jsonl`` keeps the median over ranks and the ranks slower than the median by
more than ``records.SLOW_FACTOR`` (``slow_ranks``). This module reads those records back for the
scaling report; it imports no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from knl_train import records


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    worst: float     # the largest busy time / median over the epochs read
    epochs: int      # epochs in which it was slower than the median by SLOW_FACTOR
    of_epochs: int   # epochs read (those with per-rank times)


@dataclass(frozen=True)
class RunStragglers:
    ranks: List[Straggler]                 # slowest first
    nodes: Dict[str, List[int]]            # host -> its straggling ranks
    epochs: int                            # epochs with per-rank times (0: none recorded)


def find(epochs: Sequence[records.EpochRecord]) -> RunStragglers:
    """The stragglers of a run's epoch records. The first epoch is left out when later ones exist
    (its steps include the warm-up); epochs without per-rank times (one rank) are skipped."""
    timed = [e for e in epochs if e.busy_step_seconds_median and e.slow_ranks is not None]
    if len(timed) > 1 and timed[0].epoch == min(e.epoch for e in epochs):
        timed = timed[1:]
    seen: Dict[int, Tuple[str, List[float]]] = {}
    for e in timed:
        for rank, host, busy in e.slow_ranks:
            seen.setdefault(int(rank), (str(host), []))[1].append(busy / e.busy_step_seconds_median)
    ranks = sorted((Straggler(rank=r, host=h, worst=max(ratios), epochs=len(ratios),
                              of_epochs=len(timed)) for r, (h, ratios) in seen.items()),
                   key=lambda s: (-s.worst, s.rank))
    nodes: Dict[str, List[int]] = {}
    for s in ranks:
        nodes.setdefault(s.host, []).append(s.rank)
    return RunStragglers(ranks=ranks, nodes={h: sorted(r) for h, r in nodes.items()},
                         epochs=len(timed))


def of_run(run_dir) -> Optional[RunStragglers]:
    """A run directory's stragglers, or None when its metrics are missing or unreadable."""
    path = Path(run_dir) / records.METRICS
    try:
        epochs = records.read_metrics(path, kinds=(records.EpochRecord.kind,), cut_short_ok=True)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return find(epochs)


def section(results: dict) -> List[str]:
    """The scaling report's "Stragglers" lines for ``results`` (``report.collect``'s): one line
    per straggling rank of each run; nothing when no run recorded per-rank times."""
    study_dir = Path(results["study_dir"])
    lines: List[str] = []
    timed_runs = 0
    for point in results["points"]:
        for repeat in point.get("repeats", ()):
            found = of_run(study_dir / repeat["run_dir"])
            if found is None or not found.epochs:
                continue
            timed_runs += 1
            for s in found.ranks:
                lines.append(f"- point {point['id']} ({repeat['run_dir']}): rank {s.rank} on "
                             f"node {s.host}, busy {s.worst:.2f}x the median in "
                             f"{s.epochs} of {s.of_epochs} epoch(s)")
            for host, ranks in found.nodes.items():
                if len(ranks) > 1:
                    lines.append(f"- point {point['id']} ({repeat['run_dir']}): node {host} holds "
                                 f"{len(ranks)} straggling ranks ({', '.join(map(str, ranks))})")
    if not timed_runs:
        return []
    pct = round((records.SLOW_FACTOR - 1) * 100)
    head = ["", "## Stragglers", "",
            f"Ranks whose busy time per step (the step less its wait in the gradient allreduce) "
            f"exceeded the median over the run's ranks by more than {pct}% in an epoch after the "
            f"first ({timed_runs} run(s) with per-rank times):", ""]
    return head + (lines or [f"- none: no rank was more than {pct}% slower than the median."])
