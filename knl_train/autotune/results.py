"""What a finished search yields: ``TuneResult`` (``results.json`` is its ``to_dict()``), the table
(``markdown``), the chart, and the tuned preset."""

from __future__ import annotations

import dataclasses
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from knl_train.atomic import save_figure_atomic, write_json_atomic, write_text_atomic
from knl_train.autotune.runner import Runner, Trial
from knl_train.autotune.search import ORDER, Search, median
from knl_train.autotune.space import (Candidate, Machine, Space, Workload, baseline, effective,
                                      label, settings_for)
from knl_train.tuning import preset as presets
from knl_train.tuning.preset import Match, Node, Preset, Settings

# The ISA flags a tuned preset records of its node (the built-in presets list the same kind).
NODE_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512er", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class Spread:
    """A candidate's samples (images/s): median, range and quartiles."""
    median: float
    min: float
    max: float
    q1: float
    q3: float
    samples: Tuple[float, ...]   # in the order the trials ran

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "q1": self.q1,
                "q3": self.q3, "samples": list(self.samples)}


def spread(samples: Sequence[float]) -> Spread:
    s = sorted(samples)
    q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) > 1 else (s[0], s[0]))
    return Spread(statistics.median(s), s[0], s[-1], q1, q3, tuple(samples))


@dataclass(frozen=True)
class Row:
    """One candidate's line of the table (an entry of ``candidates`` in results.json)."""
    id: int
    label: str
    candidate: Candidate
    threads_per_rank: int            # TF intra-op threads, as run
    inter_op: int                    # TF inter-op threads, as run
    stages: Tuple[str, ...]          # the comparisons it took part in
    settings: Optional[Settings]     # its preset's; None for the baseline (no preset)
    spread: Optional[Spread] = None  # None: no trial of it succeeded (see ``failed``)
    speedup: Optional[float] = None  # median over the baseline's
    failed: Optional[str] = None

    def to_dict(self) -> dict:
        c = self.candidate
        out = {"id": self.id, "label": self.label, "baseline": c.baseline,
               "candidate": dataclasses.asdict(c), "ranks": c.ranks,
               "threads_per_rank": self.threads_per_rank, "inter_op": self.inter_op,
               "precision": c.precision, "stages": list(self.stages),
               "settings": None if self.settings is None else dataclasses.asdict(self.settings)}
        if self.spread is not None:
            out.update(self.spread.to_dict())
            out["speedup"] = self.speedup
        else:
            out["failed"] = self.failed
        return out


def summarize(runner: Runner, machine: Machine) -> Tuple[Row, ...]:
    """One row per candidate measured, fastest first."""
    base_median = median(runner.samples.get(baseline(machine), ()))
    rows = []
    for c, i in runner.ids.items():
        s = runner.samples.get(c, [])
        e = effective(c, machine)
        stats = spread(s) if s else None
        rows.append(Row(
            id=i, label=label(c, machine), candidate=c, threads_per_rank=e.intra_op,
            inter_op=e.inter_op, stages=tuple(runner.where.get(c, [])),
            settings=None if c.baseline else settings_for(c, machine, runner.base), spread=stats,
            speedup=(stats.median / base_median) if stats and base_median > 0 else None,
            failed=None if stats else runner.failures.get(c, "not measured")))
    rows.sort(key=lambda r: -(r.spread.median if r.spread else float("-inf")))
    return tuple(rows)


@dataclass(frozen=True)
class StageSummary:
    """One comparison of the search, by label."""
    dimension: str
    compared: Tuple[Tuple[str, Optional[float]], ...]   # (label, median), the incumbent first
    incumbent: str
    chosen: str
    changed: bool

    def to_dict(self) -> dict:
        return {"dimension": self.dimension, "compared": list(self.compared),
                "incumbent": self.incumbent, "chosen": self.chosen, "changed": self.changed}


def stage_summaries(search: Search, machine: Machine) -> Tuple[StageSummary, ...]:
    return tuple(StageSummary(s.dimension,
                              tuple((label(c, machine), m) for c, m in zip(s.candidates, s.medians)),
                              label(s.incumbent, machine), label(s.chosen, machine),
                              s.chosen != s.incumbent)
                 for s in search.stages)


@dataclass(frozen=True)
class OutputFiles:
    preset: Path
    results: Path
    table: Path
    chart: Path

    @classmethod
    def in_dir(cls, out: Path, name: str) -> "OutputFiles":
        """The files of preset ``name`` in ``out``."""
        out = Path(out)
        return cls(out / f"{name}.yaml", out / "results.json", out / "table.md", out / "tuning.png")

    def to_dict(self) -> dict:
        return {"preset": str(self.preset), "results": str(self.results), "table": str(self.table),
                "chart": str(self.chart)}


@dataclass(frozen=True)
class TuneResult:
    """A finished search: what was measured, the best setting, and where it was written."""
    date: str
    seconds: float
    strategy: str
    repeats: int
    min_gain_pct: float
    machine: Machine
    topology: str                    # the node as ``Topology.describe`` puts it
    workload: Workload
    space: Space                     # resolved for the machine
    baseline_images_per_sec: Optional[float]
    best: Row                        # the search's end point (measured)
    speedup: Optional[float]         # best over the baseline
    candidates: Tuple[Row, ...]      # fastest first
    stages: Tuple[StageSummary, ...]
    search_end: str
    skipped: Tuple[Tuple[str, str, str], ...]   # (dimension, value, why)
    trials: Tuple[Trial, ...]
    notes: Tuple[str, ...]
    files: OutputFiles

    def to_dict(self) -> dict:
        """The ``results.json`` record."""
        best = self.best.candidate
        return {
            "date": self.date, "seconds": self.seconds, "strategy": self.strategy,
            "repeats": self.repeats, "min_gain_pct": self.min_gain_pct,
            "machine": {**dataclasses.asdict(self.machine), "topology": self.topology},
            "workload": dataclasses.asdict(self.workload),
            "space": {d: list(getattr(self.space, d)) for d in ORDER},
            "baseline_images_per_sec": self.baseline_images_per_sec,
            "best": {"id": self.best.id, "label": self.best.label,
                     "images_per_sec": self.best.spread.median, "precision": best.precision,
                     "ranks": best.ranks},
            "speedup": self.speedup,
            "candidates": [r.to_dict() for r in self.candidates],
            "stages": [s.to_dict() for s in self.stages],
            "search_end": self.search_end,
            "skipped": [list(x) for x in self.skipped],
            "trials": [t.to_dict() for t in self.trials], "notes": list(self.notes),
            "files": self.files.to_dict(),
        }


# ---- the table ---------------------------------------------------------------------------------
def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table_row(r: Row, best: Row) -> str:
    name = r.label + (" **(best)**" if r.id == best.id else "")
    where = f"| {r.id} | {name} | {r.candidate.ranks} x {r.threads_per_rank} | {r.inter_op} |"
    if r.spread is None:
        return f"{where} failed: {r.failed} | | | 0 | |"
    s = r.spread
    return (f"{where} {s.median:.2f} | {s.min:.1f}-{s.max:.1f} | {s.q1:.1f}-{s.q3:.1f} | "
            f"{len(s.samples)} | {_f(r.speedup, 2)}x |")


def markdown(result: TuneResult) -> str:
    w, m, best = result.workload, result.machine, result.best
    lines = [f"# knl-train tune: {w.model} at {w.image_size} px on {m.host}", "",
             f"{m.cpu}, {m.cores} cores x {m.threads_per_core} thread(s) in "
             f"{m.sockets} socket(s); {result.date}.", "",
             f"Batch {w.batch} images per node per step (split over the ranks), "
             f"{w.warmup} warm-up steps left out, {w.steps} timed; "
             f"{result.strategy} search, {result.repeats} interleaved repeats per "
             f"comparison; images/s median (min-max over repeats).", "",
             "| # | setting | ranks x threads | inter-op | images/s | min-max | IQR | n "
             "| vs TF defaults |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_table_row(r, best) for r in result.candidates]
    lines += ["", f"**Best: {best.label}**: {_f(best.spread.median, 2)} images/s, "
              f"{_f(result.speedup, 2)}x TF's defaults "
              f"({_f(result.baseline_images_per_sec, 2)} images/s). "
              f"Preset: `{result.files.preset}`."]
    if result.stages and result.strategy == "greedy":
        lines += ["", "## Search (medians when each stage ended)", ""]
        for s in result.stages:
            rivals = ", ".join(f"{name} {_f(ips)}" for name, ips in s.compared[1:])
            name, ips = s.compared[0]
            verdict = f"changed to {s.chosen}" if s.changed else "kept the incumbent"
            lines.append(f"- {s.dimension}: incumbent {name} {_f(ips)} against {rivals}: "
                         f"{verdict}")
    if result.skipped:
        lines += ["", "## Not tried", ""]
        lines += [f"- {d} {v}: {why}" for d, v, why in result.skipped]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


# ---- the chart ---------------------------------------------------------------------------------
def chart(result: TuneResult, path: Path) -> None:
    """Images/s per candidate with min-max error bars; the TF baseline as a dashed line."""
    # matplotlib only when a chart is drawn: it is slow to import, and the CLI loads this module.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result.candidates if r.spread is not None][::-1]   # fastest on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.42 * max(1, len(rows))))
    y = range(len(rows))
    med = [r.spread.median for r in rows]
    err = [[r.spread.median - r.spread.min for r in rows], [r.spread.max - r.spread.median for r in rows]]
    colors = ["tab:orange" if r.id == result.best.id else
              "tab:gray" if r.candidate.baseline else "tab:blue" for r in rows]
    ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
    ax.set_yticks(list(y), [f"{r.label} ({r.candidate.ranks}x{r.threads_per_rank})" for r in rows],
                  fontsize=8)
    base = result.baseline_images_per_sec
    xlabel = "images/s: median of repeats, whiskers min-max"
    if base:
        ax.axvline(base, color="black", linestyle="--", linewidth=1)
        xlabel += f"; dashed: TF defaults ({base:.1f})"
    w = result.workload
    ax.set_xlabel(xlabel)
    ax.set_title(f"{w.model} {w.image_size} px, batch {w.batch}/node on "
                 f"{result.machine.host}", fontsize=10)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


# ---- the tuned preset --------------------------------------------------------------------------
def preset_name(host: str) -> str:
    return "tuned-" + (re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-") or "node")


def _round(x, digits=2):
    return None if x is None else round(x, digits)


def tuned_preset(name: str, result: TuneResult, base: Settings, topology=None) -> Preset:
    """The best setting as preset ``name``: ``base``'s settings where the search changed none,
    what was measured, and (with ``topology``) the CPU it was measured on."""
    w, machine, row, best = result.workload, result.machine, result.best, result.best.candidate
    measured = {"images_per_sec": round(row.spread.median, 2),
                "spread": [round(row.spread.min, 2), round(row.spread.max, 2)],
                "baseline": _round(result.baseline_images_per_sec),
                "speedup": _round(result.speedup, 3), "precision": best.precision,
                "model": w.model, "image_size": w.image_size, "batch": w.batch,
                "repeats": len(row.spread.samples), "date": result.date, "host": machine.host,
                "cpu": machine.cpu}
    notes = [f"measured by knl-train tune: {label(best, machine)}, {row.spread.median:.1f} images/s, "
             f"{_f(result.speedup, 2)}x TF's defaults ({w.model}, {w.image_size} px, "
             f"batch {w.batch} per node)"]
    if best.precision != "fp32":
        notes.append(f"the speed was measured in {best.precision}, which a preset cannot set: "
                     f"put 'precision: {best.precision}' in the training config (it changes numerics)")
    if best.baseline:
        notes.append("TF's defaults were fastest: this preset approximates them (one rank, "
                     "every hardware thread, no ITEX)")
    node = None
    if topology is not None:
        node = Node(model_name=topology.model_name, vendor=topology.vendor,
                    flags=tuple(f for f in NODE_FLAGS if f in topology.flags),
                    sockets=topology.sockets, cores_per_socket=topology.cores_per_socket,
                    threads_per_core=topology.threads_per_core)
    # The CPU it was measured on: used elsewhere, it warns (tuned presets are never auto-chosen).
    match = Match(vendor=topology.vendor, flags=node.flags) if topology is not None else Match()
    return Preset(name=name, title=f"tuned on {machine.host} ({machine.cpu})", match=match,
                  node=node, ranks_per_node=best.ranks,
                  settings=settings_for(dataclasses.replace(best, baseline=False), machine, base),
                  sources=(f"knl-train tune, {result.date}: results.json beside this file",),
                  notes=tuple(notes), measured=measured)


def write(result: TuneResult, tuned: Preset) -> None:
    """The preset, results.json, the table and the chart, each written atomically."""
    presets.dump(tuned, result.files.preset)
    write_json_atomic(result.files.results, result.to_dict())
    write_text_atomic(result.files.table, markdown(result))
    chart(result, result.files.chart)
