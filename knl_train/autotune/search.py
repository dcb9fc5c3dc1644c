"""How the autotuner searches: ``greedy`` (one dimension at a time from TF's defaults) or ``grid``
(the deduplicated product). Both call a ``Measure`` and return a ``Search``; neither runs anything
itself, so they are tested against a fake measure."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

from knl_train.autotune.space import Candidate, Machine, Space, baseline, effective, infeasible

STRATEGIES = ("greedy", "grid")
# Greedy order: the biggest, least entangled levers first; blocktime after ITEX (only OpenMP
# reads it). Precision goes last: the stage before it is then the best fp32 setting (the same
# numerics as TF's defaults), and bf16 never meets Eigen's emulated bf16 kernels (oneDNN off:
# 1 image/s for ResNet-50 here).
ORDER = ("onednn", "itex", "ranks", "spare_cores", "threads_per_core", "intra_op", "inter_op",
         "blocktime", "precision")

# measure(group, dimension) runs the group's repeats and returns every sample so far per
# candidate (one whose trial failed has none). The incumbent comes first.
Measure = Callable[[Sequence[Candidate], str], Mapping[Candidate, Sequence[float]]]


@dataclass(frozen=True)
class Stage:
    dimension: str
    incumbent: Candidate
    candidates: Tuple[Candidate, ...]   # the incumbent first
    chosen: Candidate
    medians: Tuple[Optional[float], ...] = ()   # per candidate, when the stage ended


@dataclass(frozen=True)
class Search:
    stages: Tuple[Stage, ...]
    skipped: Tuple[Tuple[str, str, str], ...]   # (dimension, value, why)
    final: Candidate                             # the greedy path's end (grid: the best)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("-inf")


def value_text(v) -> str:
    """A dimension's value as the options and the table spell it (on/off for switches)."""
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def greedy(space: Space, machine: Machine, batch: int, measure: Measure,
           min_gain: float = 0.01) -> Search:
    """Change one dimension at a time, keeping a change only if its median beats the incumbent's
    by more than ``min_gain`` (a fraction)."""
    space = space.resolved(machine)
    incumbent = baseline(machine)
    stages, skipped = [], {}
    for dim in ORDER:
        if dim == "blocktime" and not incumbent.itex:
            continue
        alternatives, seen = [], {effective(incumbent, machine)}
        for value in getattr(space, dim):
            c = dataclasses.replace(incumbent, baseline=False, **{dim: value})
            why = infeasible(dim, c, machine, batch)
            if why:
                skipped[(dim, value_text(value))] = why
            elif effective(c, machine) not in seen:
                seen.add(effective(c, machine))
                alternatives.append(c)
        if not alternatives:
            continue
        group = (incumbent, *alternatives)
        samples = measure(group, dim)
        best = max(alternatives, key=lambda c: median(samples.get(c, ())))
        if samples.get(best) and (not samples.get(incumbent) or
                                  median(samples[best]) > median(samples[incumbent]) * (1 + min_gain)):
            incumbent = best
        stages.append(Stage(dim, group[0], group, incumbent, _medians(group, samples)))
    return Search(tuple(stages), tuple((d, v, w) for (d, v), w in skipped.items()), incumbent)


def grid_candidates(space: Space, machine: Machine, batch: int):
    """The baseline and every feasible combination (duplicates as run, e.g. blocktime without
    ITEX, dropped); and the skipped values with why."""
    space = space.resolved(machine)
    out, seen, skipped = [baseline(machine)], {effective(baseline(machine), machine)}, {}
    for values in itertools.product(*(getattr(space, d) for d in ORDER)):
        c = Candidate(**dict(zip(ORDER, values)))
        reasons = [(d, infeasible(d, c, machine, batch)) for d in ORDER]
        bad = [(d, w) for d, w in reasons if w]
        for d, w in bad:
            skipped[(d, value_text(getattr(c, d)))] = w
        if bad or effective(c, machine) in seen:
            continue
        seen.add(effective(c, machine))
        out.append(c)
    return out, tuple((d, v, w) for (d, v), w in skipped.items())


def grid(space: Space, machine: Machine, batch: int, measure: Measure) -> Search:
    candidates, skipped = grid_candidates(space, machine, batch)
    samples = measure(candidates, "grid")
    best = max(candidates, key=lambda c: median(samples.get(c, ())))
    return Search((Stage("grid", candidates[0], tuple(candidates), best,
                         _medians(candidates, samples)),), skipped, best)


def _medians(group, samples) -> Tuple[Optional[float], ...]:
    return tuple(statistics.median(samples[c]) if samples.get(c) else None for c in group)
