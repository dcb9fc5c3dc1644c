"""The autotuner (``knl-train tune``): measure thread and rank settings on this node, keep the
fastest as a preset.

Every trial is a short synthetic training run (``knl_train.autotune.trial``) started through the
launcher with a one-off preset, exactly as a job using the tuned preset would start; the TF
baseline runs with no preset at all (one rank, TF's own thread defaults). Repeats go round-robin
over the candidates being compared, so a slow spell of this (often shared, often virtual) node
hits all of them alike, and each candidate is judged by its median.

The default search is greedy, one dimension at a time from TF's defaults: precision, oneDNN,
ITEX, ranks per node, spare cores, hardware threads per core, intra-op, inter-op, and OpenMP
blocktime (only with ITEX on: only ITEX's OpenMP runtime reads it). A change is kept when its
median beats the incumbent's by more than ``min_gain``. The grid strategy measures the full
product instead. Outputs (written atomically into ``out``): the table (``table.md``),
``results.json``, a bar chart (``tuning.png``) and the best setting as a preset YAML that
``env`` and ``launch`` accept.

Modules: ``space`` (what is searched), ``search`` (greedy and grid), ``runner`` (running trials),
``results`` (``TuneResult``, table, chart, tuned preset), ``trial`` (one timed run per rank).
``run(TuneOptions(...)) -> TuneResult`` is the entry point; ``dry_run`` says what it would run.
"""

from __future__ import annotations

import datetime
import itertools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import knl_train.log
from knl_train.autotune import results
from knl_train.autotune.results import OutputFiles, Row, TuneResult, markdown, preset_name
from knl_train.autotune.runner import Runner, TrialFailed
from knl_train.autotune.search import (ORDER, STRATEGIES, Search, grid, grid_candidates, greedy,
                                       value_text)
from knl_train.autotune.space import (Candidate, Machine, Space, Workload, baseline,
                                      detect_machine, label)
from knl_train.errors import UserError
from knl_train.tuning import preset as presets
from knl_train.tuning import topology as topo
from knl_train.tuning.preset import Preset

__all__ = ["TuneOptions", "TuneResult", "TrialFailed", "Workload", "Space", "Candidate", "Machine",
           "STRATEGIES", "run", "dry_run", "markdown"]

log = knl_train.log.get(__name__)


@dataclass(frozen=True)
class TuneOptions:
    """What ``knl-train tune`` was asked for."""
    workload: Workload = field(default_factory=Workload)
    space: Space = field(default_factory=Space)
    strategy: str = "greedy"         # one of STRATEGIES
    repeats: int = 3                 # trials per candidate per comparison, interleaved
    min_gain: float = 1.0            # percent a change must gain over the incumbent's median
    timeout: float = 900.0           # seconds per trial
    keep_going: bool = False         # carry on without a candidate whose trial fails
    out: str = ""                    # output directory; "" = tune-<host>
    name: str = ""                   # preset name; "" = tuned-<host>
    progress: bool = True            # a bar (on a terminal) and a line per trial


@dataclass(frozen=True)
class _Setup:
    """The node and where the results go, as worked out before the first trial."""
    topology: topo.Topology
    machine: Machine
    detected: Preset                 # supplies every setting the search does not change
    space: Space                     # resolved for the machine
    out: Path
    name: str


def _prepare(options: TuneOptions, topology) -> _Setup:
    topology = topo.detect() if topology is None else topology
    machine = detect_machine(topology)
    out = Path(options.out or f"tune-{preset_name(machine.host)[len('tuned-'):]}")
    setup = _Setup(topology, machine, presets.detect(topology), options.space.resolved(machine),
                   out, options.name or preset_name(machine.host))
    w = options.workload
    log.info(topology.describe())
    log.info(f"{w.model} at {w.image_size} px, batch {w.batch} per node, {w.warmup} warm-up + "
             f"{w.steps} timed steps per trial; {options.strategy} search, {options.repeats} repeats")
    for dim in ORDER:
        log.info(f"  {dim}: {', '.join(value_text(v) for v in getattr(setup.space, dim))}")
    return setup


def dry_run(options: TuneOptions, *, topology=None) -> Tuple[str, ...]:
    """Say what ``run`` would measure; the grid's candidates by label (greedy: none, as each
    stage depends on the one before)."""
    setup = _prepare(options, topology)
    if options.strategy != "grid":
        log.info("greedy: one stage per dimension with more than one feasible value, in the "
                 "order above; each stage runs the incumbent and its alternatives")
        return ()
    cands, _ = grid_candidates(options.space, setup.machine, options.workload.batch)
    log.info(f"grid: {len(cands)} candidates x {options.repeats} repeats = "
             f"{len(cands) * options.repeats} trials")
    return tuple(label(c, setup.machine) for c in cands)


def run(options: TuneOptions, *, topology=None) -> TuneResult:
    """Search, then write the table, results.json, the chart and the tuned preset."""
    setup = _prepare(options, topology)
    runner = Runner(options.workload, setup.machine, _trials_dir(setup.out),
                    repeats=options.repeats, timeout=options.timeout,
                    keep_going=options.keep_going, base=setup.detected.settings,
                    progress=options.progress)
    t0 = time.perf_counter()
    try:
        search = _search(options, setup.machine, runner)
    finally:
        runner.close()
    result = _result(options, setup, search, runner, time.perf_counter() - t0)
    results.write(result, results.tuned_preset(setup.name, result, runner.base, setup.topology))
    return result


def _trials_dir(out: Path) -> Path:
    work = out / "trials"
    work.mkdir(parents=True, exist_ok=True)
    for old in itertools.chain(work.glob("trial-*"), work.glob("candidate-*.yaml")):
        old.unlink()  # an earlier run's: their numbering would mix with ours
    return work


def _search(options: TuneOptions, machine: Machine, runner: Runner) -> Search:
    batch = options.workload.batch
    if options.strategy == "grid":
        return grid(options.space, machine, batch, runner.measure)
    return greedy(options.space, machine, batch, runner.measure, options.min_gain / 100)


def _best(search: Search, runner: Runner, rows: Tuple[Row, ...], out: Path) -> Row:
    """The row of the search's end point, or (if it never ran) the fastest."""
    measured = [r for r in rows if r.spread is not None]
    if not measured:
        raise UserError(f"no trial succeeded; see the logs in {out / 'trials'}")
    # The search's end point: greedy kept only changes that beat their incumbent side by side
    # (by --min-gain), so the highest median of all rows could be one it rightly rejected.
    if search.final in runner.samples:
        return next(r for r in measured if r.id == runner.ids[search.final])
    return measured[0]


def _notes(best: Candidate, base_median: Optional[float], detected: Preset) -> Tuple[str, ...]:
    notes = []
    if best.precision != "fp32":
        notes.append(f"The best setting trains in {best.precision}: set 'precision: "
                     f"{best.precision}' in the training config to get this speed (bf16 changes "
                     "numerics; the preset cannot carry precision).")
    if base_median is None:
        notes.append("The TF-default baseline did not run, so there is no speed-up.")
    notes.append(f"Settings the search does not change (fusion buffer, cycle time, memory policy, "
                 f"affinity style, data threads) come from the detected preset {detected.name}.")
    return tuple(notes)


def _result(options: TuneOptions, setup: _Setup, search: Search, runner: Runner,
            seconds: float) -> TuneResult:
    rows = results.summarize(runner, setup.machine)
    best = _best(search, runner, rows, setup.out)
    base_samples = runner.samples.get(baseline(setup.machine))
    base_median = statistics.median(base_samples) if base_samples else None
    return TuneResult(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        seconds=round(seconds, 1), strategy=options.strategy, repeats=options.repeats,
        min_gain_pct=options.min_gain, machine=setup.machine,
        topology=setup.topology.describe(), workload=options.workload, space=setup.space,
        baseline_images_per_sec=base_median, best=best,
        speedup=(best.spread.median / base_median) if base_median else None, candidates=rows,
        stages=results.stage_summaries(search, setup.machine),
        search_end=label(search.final, setup.machine), skipped=search.skipped,
        trials=tuple(runner.trials), notes=_notes(best.candidate, base_median, setup.detected),
        files=OutputFiles.in_dir(setup.out, setup.name))
