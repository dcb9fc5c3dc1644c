"""Write a convergence study's report: ``report/convergence.csv`` (every point), ``.md`` (the table
per optimizer and batch, the verdict, the runs without accuracy) and the charts that have
something to show (``accuracy_charts``).

A study where every run diverged or failed still gets its CSV and Markdown: they say why, point
by point. Only a study none of whose points has started (no run directory, no job output) has
nothing to report.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from knl_train.atomic import write_text_atomic
from knl_train.errors import UserError
from knl_train.studies import accuracy, accuracy_charts, walltime
from knl_train.studies.accuracy import number, pct

COLUMNS = ("id", "optimizer", "global_batch", "lr", "repeat", "accumulation", "nodes", "ranks",
           "status", "top1", "top5", "best_top1", "best_top5", "epochs_to_target",
           "seconds_to_target", "updates", "wall_seconds", "epochs_evaluated", "resumed",
           "reason", "output", "run_dir")


def csv_text(results: dict) -> str:
    """One row per point, every column; floats as repr, so they read back to the same numbers."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for p in sorted(results["points"], key=lambda p: p["id"]):
        row = {**p, "epochs_evaluated": len(p["curve"])}
        w.writerow({k: repr(v) if isinstance(v, float) else ("" if v is None else v)
                    for k, v in row.items()})
    return buf.getvalue()


def _hms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else walltime.hms(seconds)


def _spread(row: dict, key: str) -> str:
    v, lo, hi = row[key], row[f"{key}_min"], row[f"{key}_max"]
    return ("—" if v is None else pct(v) if row["repeats"] < 2
            else f"{pct(v)} ({100 * lo:.1f}-{100 * hi:.1f})")


def _best_lr_cell(row: dict) -> str:
    """The best LR, with its usable share when no LR had every repeat usable."""
    part = (f" ({row['repeats']} of {row['best_lr_runs']} runs)"
            if row["best_lr"] is not None and row["repeats"] < row["best_lr_runs"] else "")
    return number(row["best_lr"]) + part


def _target_cells(row: dict) -> Tuple[str, str]:
    if row["best_lr"] is None:
        return "—", "—"
    if row["target"] is None:
        return "no target", "no target"
    if not row["reached"]:
        return "not reached", "not reached"
    part = "" if row["reached"] == row["repeats"] else f" ({row['reached']} of {row['repeats']})"
    epochs = f"{row['epochs_to_target']:g}{part}"
    return epochs, _hms(row["seconds_to_target"]) + part


def _table_lines(rows: List[dict]) -> List[str]:
    lines = []
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        lines += ["", f"## {opt}", "",
                  "| global batch | accumulation | best LR | final top-1 | final top-5 "
                  "| best top-1 | best top-5 | epochs to target | time to target | updates "
                  "| LRs tried (final top-1) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|"]
        for r in (r for r in rows if r["optimizer"] == opt):
            epochs, seconds = _target_cells(r)
            lines.append(
                f"| {r['global_batch']} | {r['accumulation'] or '—'} | {_best_lr_cell(r)} | "
                + " | ".join(_spread(r, k) for k in ("top1", "top5", "best_top1", "best_top5"))
                + f" | {epochs} | {seconds} | "
                f"{'—' if r['updates'] is None else format(r['updates'], '.0f')} | "
                f"{', '.join(r['lrs'])} |")
    return lines


def _definitions(results: dict) -> List[str]:
    target, ref, epochs = (results.get(k) for k in ("target_top1", "reference_batch", "epochs"))
    run = f" of {epochs} epoch{'' if epochs == 1 else 's'}" if epochs else ""
    return [
        f"Each point is one run{run}. LRs are the peak LR at the reference batch"
        f"{f' {ref}' if ref else ''}, rescaled per batch by the optimizer's own "
        "schedule.scaling. Final top-1/top-5: the last evaluation (summary.json); best: the "
        "highest over the epochs' evaluations (metrics.jsonl). Best LR: the highest mean final "
        "top-1 over repeats (a tie goes to the smaller LR) among the LRs whose every repeat gave "
        "a usable run; an LR with a diverged, failed, damaged or missing repeat is best only when "
        "no LR has all its repeats usable (then the largest share of usable repeats comes "
        "first), and is marked (k of n runs). Its values are "
        "means over its usable repeats, min-max in brackets when there are several. "
        + (f"Target: validation top-1 ≥ {pct(target)}; epochs to target = the first epoch "
           "that reaches it, time to target = the run's wall clock from its process start to "
           "the end of that epoch (its evaluation included)."
           if target is not None else "No target_top1 was set: no time to target.")]


def _note_lines(results: dict) -> List[str]:
    """Usable runs with something to say (a metrics line left out), and resumed runs."""
    notes = [f"- {p['id']}: {p['reason']}" for p in sorted(results["points"],
                                                             key=lambda p: p["id"])
             if p["status"] == "ok" and p["reason"]]
    resumed = [p["id"] for p in results["points"] if p["resumed"]]
    if resumed:
        notes.append(f"- Resumed runs ({', '.join(resumed)}): the wall time adds each "
                     "process's clock up to its last epoch; time lost after that epoch in a "
                     "process that stopped is not counted.")
    return ["", "## Notes", "", *notes] if notes else []


def markdown(results: dict, rows: List[dict]) -> str:
    lines = [f"# Convergence study {results['study']}", "", *_definitions(results), "",
             "## Verdict", "", "Per optimizer, the largest global batch up to which every "
             "batch's final top-1 (best LR) stays within 1 point of its smallest batch's.", "",
             *[f"- {v}" for v in accuracy.row_verdict(rows)], *_table_lines(rows),
             "", "## Diverged, failed and missing runs", ""]
    bad = [p for lrs in accuracy.groups(results).values() for runs in lrs.values() for p in runs
           if p["status"] != "ok"]
    lines += ([f"- {p['id']}: {p['status']}: {p['reason']}" for p in bad]
              or ["None: every run has a usable summary.json."])
    return "\n".join(lines + _note_lines(results)) + "\n"


def _check_started(study_dir: Path, results: dict) -> None:
    """A UserError if no point has started: no run directory and no job output anywhere."""
    if any(p["output"] or (p["run_dir"] and (study_dir / p["run_dir"]).is_dir())
           for p in results["points"]):
        return
    states = Counter((p["job"] or {}).get("state") or "no job" for p in results["points"])
    raise UserError(f"no point of study {results['study']} has run yet (no run directory or job "
                    f"output under {study_dir / 'points'}; jobs: "
                    f"{', '.join(f'{n} {s}' for s, n in states.items())}): submit it with "
                    f"`knl-train study submit {study_dir}`, or wait for it with `knl-train study "
                    f"status {study_dir} --wait`")


def _charts(results: dict, rows: List[dict], paths: Dict[str, Path]) -> Dict[str, Path]:
    """Draw the charts that have something to show; remove an earlier report's that do not
    (they would contradict this one's table). Returns the ones drawn."""
    draw = {"png": lambda path: accuracy_charts.chart(results, rows, path),
            "curves": lambda path: accuracy_charts.curves_chart(results, path)}
    drawn, left = {}, dict(paths)
    try:
        for key, path in paths.items():
            if draw[key](path):
                drawn[key] = path
            else:
                path.unlink(missing_ok=True)
            del left[key]
    except ImportError as e:
        warnings.warn(f"matplotlib is not available ({e}): "
                      f"{' and '.join(str(p) for p in left.values())} not drawn")
    return drawn


def report(study_dir, out=None) -> Dict[str, Path]:
    """Collect afresh, then write convergence.csv and .md, and convergence.png (needs a usable
    run) and convergence-curves.png (an evaluated epoch) when they have something to show.
    Returns the paths written."""
    study_dir = Path(study_dir)
    results = accuracy.collect(study_dir)
    _check_started(study_dir, results)
    rows = accuracy.table(results)
    out = Path(out) if out is not None else study_dir / "report"
    paths = {"results": study_dir / accuracy.RESULTS, "csv": out / "convergence.csv",
             "md": out / "convergence.md"}
    write_text_atomic(paths["csv"], csv_text(results))
    write_text_atomic(paths["md"], markdown(results, rows))
    return {**paths, **_charts(results, rows, {"png": out / "convergence.png",
                                               "curves": out / "convergence-curves.png"})}
