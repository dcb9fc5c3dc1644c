"""Collect a convergence study's results and write its report (CSV, Markdown, two PNGs).

A point is one run (optimizer label, global batch, peak LR at the reference batch, repeat): its
final top-1/top-5 from ``summary.json``, its curve, best accuracy and time to ``target_top1``
from ``metrics.jsonl``. The best LR per optimizer and batch has the highest mean final top-1.
:func:`verdict` (the scaling report's too) names the largest batch within one point of the
smallest batch's accuracy.
"""

from __future__ import annotations

import csv
import io
import statistics
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from knl_train import records
from knl_train.atomic import save_figure_atomic, write_json_atomic, write_text_atomic
from knl_train.errors import UserError
from knl_train.studies.manifest import Manifest, PointRecord

RESULTS = "results.json"
HOLD = 0.01            # the verdict's tolerance: one point of top-1 (accuracies are fractions)
# Job states after which a point without summary.json will not get one.
ENDED = ("completed", "failed", "timeout", "cancelled", "submit-failed")
# The divergence guard's message (train.control), looked for in a point's job output.
NONFINITE = "the loss is not finite"
COLUMNS = ("id", "optimizer", "global_batch", "lr", "repeat", "accumulation", "nodes", "ranks",
           "status", "top1", "top5", "best_top1", "best_top5", "epochs_to_target",
           "seconds_to_target", "updates", "wall_seconds", "epochs_evaluated", "resumed",
           "reason", "run_dir")
Curve = List[Tuple[int, float, Optional[float], Optional[float]]]


# ---- collect ---------------------------------------------------------------------------------

def _num(x) -> Optional[float]:
    """A finite number as float, else None (NaN must not reach results.json)."""
    return float(x) if records.is_number(x) else None


def _job(point: PointRecord) -> Tuple[Optional[str], str]:
    """The point's last known job state, and a note naming the job."""
    job = point.job
    if job is None:
        return None, "no job recorded in the manifest"
    return job.state, f"job {job.id + ' ' if job.id else ''}{job.state or 'state unknown'}"


def _curve(path: Path, rel: str) -> Tuple[Curve, Optional[int], bool]:
    """The evaluated epochs (epoch, top1, top5, wall seconds), the first step whose loss is not
    finite, and whether the run restarted; ValueError names a bad line.

    A resumed run's process starts its clock again: wall times add each process's last one.
    An epoch written twice (before a crash and again after the resume) keeps the later record.
    """
    by_epoch: Dict[int, tuple] = {}
    nonfinite, offset, last, restarted = None, 0.0, None, False
    for rec in records.read_metrics(path, rel, kinds=("step", "epoch")):
        if nonfinite is None and rec.loss is not None and _num(rec.loss) is None:
            nonfinite = rec.step
        if rec.kind != "epoch":
            continue
        wall = _num(rec.wall_seconds)
        if wall is not None:
            if last is not None and wall < last:
                offset, restarted = offset + last, True
            last = wall
        top1 = _num(rec.val_top1)
        if top1 is not None and records.is_integer(rec.epoch):
            by_epoch[rec.epoch] = (rec.epoch, top1, _num(rec.val_top5),
                                   None if wall is None else offset + wall)
    return [by_epoch[e] for e in sorted(by_epoch)], nonfinite, restarted


def _output_says_diverged(point_dir: Path) -> bool:
    """Whether the job's output (slurm-*.out and the like) holds the divergence guard's error."""
    for f in (f for f in sorted(point_dir.glob("*")) if f.suffix in (".out", ".err", ".log")):
        try:
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - 65536))   # the error is near the end
                if NONFINITE.encode() in fh.read():
                    return True
        except OSError:
            continue
    return False


def _without_summary(study_dir: Path, rel: str, point: PointRecord, nonfinite) -> dict:
    state, note = _job(point)
    if nonfinite is not None or _output_says_diverged((study_dir / rel).parent):
        at = f" at step {nonfinite}" if nonfinite is not None else ""
        return {"status": "diverged", "reason": f"the loss is not finite{at}; no summary.json; "
                                                f"{note}"}
    if state in ENDED:
        return {"status": "failed", "reason": f"no summary.json; {note}"}
    return {"status": "missing", "reason": f"no summary.json; {note}"}


def _summary(study_dir: Path, rel: str, point: PointRecord):
    """(summary, None), or (None, the status and reason why it cannot be used)."""
    srel = f"{rel}/{records.SUMMARY}"
    try:
        summary = records.read_summary(study_dir / srel)
    except (OSError, UnicodeDecodeError) as e:
        return None, {"status": "problem", "reason": f"{srel} is damaged: {e}"}
    except ValueError as e:  # "is damaged: ..." or "is not a JSON object"
        return None, {"status": "problem", "reason": f"{srel} {e}"}
    bad = [k for k in ("world_size", "global_batch") if not records.is_integer(getattr(summary, k))]
    if bad:
        return None, {"status": "problem", "reason": f"{srel}: missing or invalid {', '.join(bad)}"}
    # A run with other ranks or another batch measured something else than this point.
    mismatch = [f"{k} {got} != point {want}"
                for k, got, want in (("world_size", summary.world_size, point.ranks),
                                     ("global_batch", summary.global_batch, point.global_batch))
                if got != want]
    if mismatch:
        return None, {"status": "problem", "reason": f"{srel}: {'; '.join(mismatch)}"}
    return summary, None


def _to_target(curve: Curve, target: Optional[float]):
    """(epochs, seconds, reached) to the first evaluation at or above ``target``."""
    if target is None:
        return None, None, None
    hit = next((c for c in curve if c[1] >= target), None)
    return (None, None, False) if hit is None else (hit[0], hit[3], True)


def _run(study_dir: Path, point: PointRecord, target: Optional[float]) -> dict:
    """One point's run: its accuracy, curve and time to target, or why it has none."""
    rel = point.run_dirs[0] if point.run_dirs else None
    out = {"run_dir": rel, "status": "missing", "reason": "no run directory in the manifest",
           "top1": None, "top5": None, "best_top1": None, "best_top5": None,
           "epochs_to_target": None, "seconds_to_target": None, "target_reached": None,
           "updates": None, "wall_seconds": None, "resumed": False, "curve": []}
    if rel is None:
        return out
    curve, nonfinite, restarted, problem = [], None, False, None
    mrel = f"{rel}/{records.METRICS}"
    if (study_dir / mrel).is_file():
        try:
            curve, nonfinite, restarted = _curve(study_dir / mrel, mrel)
        except (OSError, UnicodeDecodeError) as e:
            problem = f"{mrel}: {e}"
        except ValueError as e:
            problem = str(e)
    out.update(curve=[list(c) for c in curve], resumed=restarted)
    if not (study_dir / rel / records.SUMMARY).is_file():
        return {**out, **_without_summary(study_dir, rel, point, nonfinite)}
    summary, bad = _summary(study_dir, rel, point)
    if bad:
        return {**out, **bad}
    out.update(updates=summary.steps if records.is_integer(summary.steps) else None,
               wall_seconds=_num(summary.wall_seconds),
               resumed=restarted or records.is_integer(summary.resumed_from_step))
    top1 = _num(summary.top1)
    if top1 is None:
        if nonfinite is not None or (summary.train_loss is not None and _num(summary.train_loss) is None):
            return {**out, "status": "diverged", "reason": f"{rel}: the loss is not finite"
                    + (f" at step {nonfinite}" if nonfinite is not None else "")}
        return {**out, "status": "problem", "reason": f"{rel}/{records.SUMMARY} has no top-1: "
                                                      "the run did not evaluate"}
    if problem:
        return {**out, "status": "problem", "reason": problem}
    top5 = _num(summary.top5)
    top5s = [v for v in [top5, *(c[2] for c in curve)] if v is not None]
    epochs, seconds, reached = _to_target(curve, target)
    return {**out, "status": "ok", "reason": None, "top1": top1, "top5": top5,
            "best_top1": max([top1, *(c[1] for c in curve)]), "best_top5": max(top5s, default=None),
            "epochs_to_target": epochs, "seconds_to_target": seconds, "target_reached": reached}


def collect(study_dir) -> dict:
    """Every point's run: accuracy, curve, time to target; written to DIR/results.json."""
    study_dir = Path(study_dir)
    m = Manifest.load(study_dir)
    points = [{**{k: getattr(p, k) for k in ("id", "optimizer", "global_batch", "lr", "repeat",
                                              "accumulation", "nodes", "ranks", "per_rank_batch")},
               "job": None if p.job is None else p.job.to_dict(),
               **_run(study_dir, p, m.target_top1)} for p in m.points]
    results = {"version": 1, "kind": "convergence", "study_dir": str(study_dir),
               **{k: getattr(m, k) for k in ("study", "scheduler", "repeats", "epochs",
                                              "target_top1", "reference_batch")},
               "points": points}
    write_json_atomic(study_dir / RESULTS, results)
    return results


# ---- table -----------------------------------------------------------------------------------

def _groups(results: dict) -> Dict[tuple, Dict[float, List[dict]]]:
    """Points by (optimizer, global batch), then by LR ascending, then repeat."""
    out: Dict[tuple, Dict[float, List[dict]]] = {}
    for p in sorted(results["points"], key=lambda p: (str(p["optimizer"]), p["global_batch"],
                                                      p["lr"] or 0.0, p["repeat"] or 0)):
        out.setdefault((p["optimizer"], p["global_batch"]), {}).setdefault(p["lr"], []).append(p)
    return out


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _g(x) -> str:
    return "—" if x is None else f"{x:g}"


def _lr_label(lr, runs: List[dict]) -> str:
    ok = [r for r in runs if r["status"] == "ok"]
    if ok:
        part = "" if len(ok) == len(runs) else f" ({len(ok)} of {len(runs)} runs)"
        return f"{_g(lr)}: {100 * _mean(r['top1'] for r in ok):.1f} %{part}"
    statuses = {r["status"] for r in runs}
    # The worst news first: one diverged repeat makes the LR "diverged".
    return f"{_g(lr)}: " + next((s for s in ("diverged", "failed", "problem", "missing")
                                  if s in statuses), "no data")


def _row(optimizer: str, batch: int, by_lr: Dict[float, List[dict]], target) -> dict:
    best, best_mean = None, None
    for lr in by_lr:   # ascending (_groups): a tie keeps the smaller LR
        mean = _mean(r["top1"] for r in by_lr[lr] if r["status"] == "ok")
        if mean is not None and (best_mean is None or mean > best_mean):
            best, best_mean = lr, mean
    row = {"optimizer": optimizer, "global_batch": batch, "best_lr": best,
           "lrs": [_lr_label(lr, runs) for lr, runs in by_lr.items()]}
    runs = [r for r in by_lr.get(best, []) if r["status"] == "ok"]
    row["accumulation"] = next((r["accumulation"] for lr_runs in by_lr.values()
                                for r in lr_runs if r["accumulation"] is not None), None)
    for k in ("top1", "top5", "best_top1", "best_top5", "updates"):
        values = [r[k] for r in runs if r[k] is not None]
        row[k] = _mean(values)
        row[f"{k}_min"], row[f"{k}_max"] = (min(values), max(values)) if values else (None, None)
    reached = [r for r in runs if r["target_reached"]]
    row.update(repeats=len(runs), reached=len(reached),
               epochs_to_target=_mean(r["epochs_to_target"] for r in reached),
               seconds_to_target=_mean(r["seconds_to_target"] for r in reached), target=target)
    return row


def table(results: dict) -> List[dict]:
    """One row per (optimizer, global batch): the best LR's accuracy and time to target, and
    every LR tried. Rows without any usable run are kept (their LRs say why)."""
    return [_row(opt, batch, by_lr, results.get("target_top1"))
            for (opt, batch), by_lr in _groups(results).items()]


# ---- verdict ---------------------------------------------------------------------------------

def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def verdict(points: Iterable[Tuple[str, int, Optional[float]]]) -> List[str]:
    """Per optimizer label, the largest global batch up to which every batch keeps its top-1
    within one point of the smallest batch's. Several values at one batch are averaged; None
    is a batch without accuracy (diverged, failed, not evaluated)."""
    by_label: Dict[str, Dict[int, List[float]]] = {}
    for label, batch, top1 in points:
        values = by_label.setdefault(str(label), {}).setdefault(batch, [])
        if _num(top1) is not None:
            values.append(float(top1))
    lines = []
    for label, batches in by_label.items():
        acc = {b: _mean(v) for b, v in sorted(batches.items())}
        measured = [b for b, v in acc.items() if v is not None]
        if not measured:
            lines.append(f"{label}: no accuracy measured")
            continue
        base, largest = measured[0], max(acc)
        unmeasured = [b for b in acc if b < base]
        note = f" (no accuracy at {', '.join(map(str, unmeasured))})" if unmeasured else ""
        held, broke = base, None
        for b in (b for b in acc if b > base):
            if acc[b] is None or acc[b] < acc[base] - HOLD - 1e-12:
                broke = b
                break
            held = b

        def at(b: int, sep: str) -> str:
            return ("no accuracy" if acc[b] is None else
                    sep.format(_pct(acc[b]), f"{100 * (acc[b] - acc[base]):+.1f} points"))
        if broke is None and held == base:
            lines.append(f"{label}: only global batch {base} measured "
                         f"({_pct(acc[base])}){note}")
        elif broke is None:
            lines.append(f"{label}: holds its accuracy up to global batch {held} "
                         f"({_pct(acc[held])} vs {_pct(acc[base])} at {base}){note}")
        else:
            first = f" (at {broke}: {at(broke, '{}, {}')})" if broke != largest else ""
            lines.append(f"{label}: within 1 point only up to {held}{first}; at {largest} "
                         f"{at(largest, '{} ({})')} vs {_pct(acc[base])} at {base}{note}")
    return lines


def row_verdict(rows: List[dict]) -> List[str]:
    """The verdict on the table's rows: each optimizer's best LR per global batch."""
    return verdict((r["optimizer"], r["global_batch"], r["top1"]) for r in rows)


# ---- report ----------------------------------------------------------------------------------

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
    s = None if seconds is None else int(round(seconds))
    return "n/a" if s is None else f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _spread(row: dict, key: str) -> str:
    v, lo, hi = row[key], row[f"{key}_min"], row[f"{key}_max"]
    return ("—" if v is None else _pct(v) if row["repeats"] < 2
            else f"{_pct(v)} ({100 * lo:.1f}-{100 * hi:.1f})")


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
                f"| {r['global_batch']} | {r['accumulation'] or '—'} | "
                f"{_g(r['best_lr'])} | "
                + " | ".join(_spread(r, k) for k in ("top1", "top5", "best_top1", "best_top5"))
                + f" | {epochs} | {seconds} | "
                f"{'—' if r['updates'] is None else format(r['updates'], '.0f')} | "
                f"{', '.join(r['lrs'])} |")
    return lines


def _definitions(results: dict) -> List[str]:
    target, ref, epochs = (results.get(k) for k in ("target_top1", "reference_batch", "epochs"))
    return [
        f"Each point is one run{f' of {epochs} epochs' if epochs else ''}. LRs are the "
        f"peak LR at the reference batch{f' {ref}' if ref else ''}, rescaled per batch by the "
        "optimizer's own schedule.scaling. Final top-1/top-5: the last evaluation "
        "(summary.json); best: the highest over the epochs' evaluations (metrics.jsonl). Best "
        "LR: the highest mean final top-1 over repeats (a tie goes to the smaller LR); its "
        "values are means over repeats, min-max in brackets when there are several. "
        + (f"Target: validation top-1 ≥ {_pct(target)}; epochs to target = the first epoch "
           "that reaches it, time to target = the run's wall clock from its process start to "
           "the end of that epoch (its evaluation included)."
           if target is not None else "No target_top1 was set: no time to target.")]


def markdown(results: dict, rows: List[dict]) -> str:
    lines = [f"# Convergence study {results['study']}", "", *_definitions(results), "",
             "## Verdict", "", "Per optimizer, the largest global batch up to which every "
             "batch's final top-1 (best LR) stays within 1 point of its smallest batch's.", "",
             *[f"- {v}" for v in row_verdict(rows)], *_table_lines(rows),
             "", "## Diverged, failed and missing runs", ""]
    bad = [p for lrs in _groups(results).values() for runs in lrs.values() for p in runs
           if p["status"] != "ok"]
    lines += ([f"- {p['id']}: {p['status']}: {p['reason']}" for p in bad]
              or ["None: every run has a usable summary.json."])
    resumed = [p["id"] for p in results["points"] if p["resumed"]]
    if resumed:
        lines += ["", "## Notes", "", f"- Resumed runs ({', '.join(resumed)}): the wall time "
                  "adds each process's clock up to its last epoch; time lost after that epoch "
                  "in a process that stopped is not counted."]
    return "\n".join(lines) + "\n"


def _pyplot():  # matplotlib is optional (report() goes on without the charts) and slow to load
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chart(results: dict, rows: List[dict], path: Path) -> None:
    """Final top-1 of the best LR against global batch (log2), one line per optimizer, and the
    base batch's accuracy as a reference with the band one point below it."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator
    have = [r for r in rows if r["top1"] is not None]
    ticks = sorted({r["global_batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    try:
        if have:
            smallest = min(r["global_batch"] for r in have)
            base = 100 * max(r["top1"] for r in have if r["global_batch"] == smallest)
            ax.axhline(base, color="gray", linestyle="--",
                       label=f"base: {base:.1f} % at batch {smallest}")
            ax.axhspan(base - 100 * HOLD, base, color="gray", alpha=0.15, label="within 1 point")
        for opt in dict.fromkeys(r["optimizer"] for r in have):
            mine = [r for r in have if r["optimizer"] == opt]
            y = [100 * r["top1"] for r in mine]
            err = [[v - 100 * r["top1_min"] for v, r in zip(y, mine)],
                   [100 * r["top1_max"] - v for v, r in zip(y, mine)]]
            ax.errorbar([r["global_batch"] for r in mine], y, yerr=err, fmt="o-", capsize=3,
                        label=f"{opt} (best LR)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))   # the batches run, not powers of two
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(b) for b in ticks])
        ax.set(xlim=(ticks[0] / 1.3, ticks[-1] * 1.3), xlabel="global batch",
               ylabel="final validation top-1 (%)")
        ax.set_title(f"{results['study']}: accuracy against global batch", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def curves_chart(results: dict, path: Path) -> None:
    """Validation top-1 against epoch per point: a panel per optimizer, colour by batch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    groups = _groups(results)
    optimizers = list(dict.fromkeys(opt for opt, _ in groups))
    batches = sorted({b for _, b in groups})
    cmap = plt.get_cmap("viridis")   # stops short of its yellow end, pale on white
    colour = {b: cmap(0.85 * i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.5 * len(optimizers), 4.2),
                             squeeze=False, sharey=True)
    try:
        for ax, opt in zip(axes[0], optimizers):
            for batch, by_lr in ((b, v) for (o, b), v in groups.items() if o == opt):
                for i, (lr, runs) in enumerate(by_lr.items()):   # LRs ascending (_groups)
                    for n, run in enumerate(r for r in runs if r["curve"]):
                        ax.plot([c[0] for c in run["curve"]], [100 * c[1] for c in run["curve"]],
                                styles[i % len(styles)], color=colour[batch], marker=".",
                                label=None if n else f"batch {batch}, LR {_g(lr)}"
                                + ("" if run["status"] == "ok" else f" ({run['status']})"))
            if results.get("target_top1") is not None:
                ax.axhline(100 * results["target_top1"], color="tab:red", linestyle=":",
                           label="target")
            ax.set_title(f"{results['study']}: {opt}", fontsize=10)
            ax.set(xlabel="epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel("validation top-1 (%)")
        fig.tight_layout()
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def report(study_dir, out=None) -> Dict[str, Path]:
    """Collect afresh, then write convergence.csv, .md, .png and convergence-curves.png."""
    study_dir = Path(study_dir)
    results = collect(study_dir)
    if not any(p["status"] == "ok" for p in results["points"]):
        diverged = sum(p["status"] == "diverged" for p in results["points"])
        raise UserError(f"no point of study {results['study']} has a usable summary.json yet"
                        + (f" ({diverged} run(s) diverged)" if diverged else "") + f": the "
                        f"reasons are in {study_dir / RESULTS}; run `knl-train study status "
                        f"{study_dir}` to see the jobs")
    rows = table(results)
    out = Path(out) if out is not None else study_dir / "report"
    paths = {"results": study_dir / RESULTS, "csv": out / "convergence.csv",
             "md": out / "convergence.md", "png": out / "convergence.png",
             "curves": out / "convergence-curves.png"}
    write_text_atomic(paths["csv"], csv_text(results))
    write_text_atomic(paths["md"], markdown(results, rows))
    try:
        chart(results, rows, paths["png"])
        curves_chart(results, paths["curves"])
    except ImportError as e:
        warnings.warn(f"matplotlib is not available ({e}): {paths['png']} and "
                      f"{paths['curves']} not drawn")
        del paths["png"], paths["curves"]
    return paths
