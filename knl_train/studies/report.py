"""Collect a scaling study's results and write its report (CSV, Markdown, PNG).

Definitions follow jobs_and_schedulers.md 2.6: X is throughput (images/s), the median over
repeats of each repeat's median per-step rate after the warm-up; the baseline is the smallest
node count with data (N0, X0); speed-up X/X0; efficiency (X/N)/(X0/N0). A repeat without step
records after the warm-up has only summary.json's whole-run rate, which includes the warm-up:
it is left out of its point's median, and a point with nothing else is marked and is no
baseline while a point measured after the warm-up exists. The projected time to
train adds the runs' measured start-up, evaluation and checkpoint costs (:mod:`.projection`).
The runs are read through :mod:`knl_train.records`, the study through its
:class:`~.manifest.Manifest`.
"""

from __future__ import annotations

import csv
import io
import statistics
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from knl_train import records
from knl_train.atomic import save_figure_atomic, write_json_atomic, write_text_atomic
from knl_train.errors import UserError
from knl_train.studies import accuracy, accuracy_report, projection, stragglers, walltime
from knl_train.studies.manifest import Manifest, PointRecord

RESULTS = "results.json"
EFFICIENCY_GATE = 0.75
GATE_SOURCE = ("CSC requires at least 75 % parallel efficiency for access to Mahti's large "
               "partition ([CSCfi/csc-user-guide PR #684]"
               "(https://github.com/CSCfi/csc-user-guide/pull/684))")
BASE_COLUMNS = ("nodes", "ranks", "global_batch", "images_per_sec", "images_per_sec_min",
                "images_per_sec_max", "repeats", "speedup", "efficiency", "epoch_seconds",
                *projection.COSTS)
# Marks a projection made from the step time alone (its runs have no time account).
STEPS_ONLY = "\u2020"
# Marks a rate that includes the warm-up (summary.json's whole-run rate: too few step records);
# not "*", which starts a list item at the head of a Markdown line.
WARMUP_MARK = "\u2021"


# ---- collect ---------------------------------------------------------------------------------

def _job_note(point: PointRecord) -> str:
    job = point.job
    if job is None:
        return "no job recorded in the manifest"
    if job.state:
        return f"job {job.id} {job.state}" if job.id else f"job {job.state}"
    return f"job {job.id} state unknown" if job.id else "job state unknown"


def _step_rates(path: Path, rel: str, warmup: int, resumed: Optional[int]) -> List[float]:
    """Per-step images/s from metrics.jsonl, warm-up left out; ValueError names a bad line."""
    rates = []
    # Only step records: a report does not depend on the other lines, so it does not check them.
    for rec in records.read_metrics(path, rel, kinds=(records.StepRecord.kind,)):
        # A record's rate covers the interval since the previous record; with a record
        # per step, step > warm-up means the interval starts after it. A resumed run
        # rebuilds its graph, so its first steps after the checkpoint are warm-up too.
        if rec.step <= warmup or (resumed and resumed < rec.step <= resumed + warmup):
            continue
        rates.append(float(rec.images_per_sec))
    return rates


def _repeat(study_dir: Path, rel: str, point: PointRecord, warmup: int, epochs: float) -> dict:
    """One run directory's throughput and its costs per epoch of ``epochs``, or why it has none."""
    run_dir = study_dir / rel
    out = {"run_dir": rel}
    summary_path = run_dir / records.SUMMARY
    if not summary_path.is_file():
        return {**out, "status": "missing", "reason": f"no summary.json; {_job_note(point)}"}
    srel = f"{rel}/{records.SUMMARY}"
    try:
        summary = records.read_summary(summary_path)
    except (OSError, UnicodeDecodeError) as e:
        return {**out, "status": "problem", "reason": f"{srel} is damaged: {e}"}
    except ValueError as e:  # "is damaged: ..." or "is not a JSON object"
        return {**out, "status": "problem", "reason": f"{srel} {e}"}
    bad = [k for k, ok in (("images_per_sec", records.is_number(summary.images_per_sec)
                            and summary.images_per_sec > 0),
                           ("world_size", records.is_integer(summary.world_size)),
                           ("global_batch", records.is_integer(summary.global_batch)))
           if not ok]
    if bad:
        return {**out, "status": "problem",
                "reason": f"{srel}: missing or invalid {', '.join(bad)}"}
    # A run with other ranks or another batch measured something else than this point.
    mismatch = [f"{k} {got} != point {want}"
                for k, got, want in (("world_size", summary.world_size, point.ranks),
                                     ("global_batch", summary.global_batch, point.global_batch))
                if got != want]
    if mismatch:
        return {**out, "status": "problem", "reason": f"{srel}: {'; '.join(mismatch)}"}
    metrics = run_dir / records.METRICS
    rates: List[float] = []
    if metrics.is_file():
        resumed = summary.resumed_from_step
        try:
            rates = _step_rates(metrics, f"{rel}/{records.METRICS}", warmup,
                                resumed if records.is_integer(resumed) else None)
        except (OSError, UnicodeDecodeError) as e:
            return {**out, "status": "problem", "reason": f"{rel}/{records.METRICS}: {e}"}
        except ValueError as e:
            return {**out, "status": "problem", "reason": str(e)}
    costs = projection.repeat_costs(summary, run_dir, epochs)
    # For the accuracy verdict, where known: the last evaluation's top-1, the optimizer's name.
    costs.update({k: v for k, v, ok in (("top1", summary.top1, records.is_number(summary.top1)),
                                        ("optimizer", summary.optimizer,
                                         isinstance(summary.optimizer, str))) if ok})
    if rates:
        return {**out, "status": "ok", "images_per_sec": statistics.median(rates),
                "source": "metrics", "steps_used": len(rates), **costs}
    # The whole-run rate includes the warm-up: a fallback, marked so the report can say so.
    return {**out, "status": "ok", "images_per_sec": float(summary.images_per_sec),
            "source": "summary", "steps_used": 0, **costs}


def collect(study_dir) -> dict:
    """Every point's repeats, median throughput and median costs; written to DIR/results.json."""
    study_dir = Path(study_dir)
    m = Manifest.load(study_dir)
    if m.kind == "convergence":
        return accuracy.collect(study_dir)
    warmup = int(m.warmup_steps)
    points = []
    for p in m.points:
        repeats = [_repeat(study_dir, rel, p, warmup, m.project_epochs) for rel in p.run_dirs]
        ok = [r for r in repeats if r["status"] == "ok"]
        # A whole-run rate includes the warm-up (16 against 526 images/s was seen): it stays
        # out of the median while a repeat measured after the warm-up exists, and else the
        # point is marked and kept out of the baseline.
        clean = [r["images_per_sec"] for r in ok if r["source"] == "metrics"]
        values = clean or [r["images_per_sec"] for r in ok]
        point = {"id": p.id, "nodes": p.nodes, "ranks_per_node": p.ranks_per_node, "ranks": p.ranks,
                 "global_batch": p.global_batch, "per_rank_batch": p.per_rank_batch, "steps": p.steps,
                 "job": None if p.job is None else p.job.to_dict()}
        point.update({"repeats": repeats, "values": values, "n": len(values),
                      "warmup_included": bool(values) and not clean,
                      "left_out": [r["run_dir"] for r in ok if clean and r["source"] != "metrics"],
                      "images_per_sec": statistics.median(values) if values else None,
                      "images_per_sec_min": min(values) if values else None,
                      "images_per_sec_max": max(values) if values else None,
                      **projection.point_costs(repeats)})
        points.append(point)
    results = {"version": 1, "study_dir": str(study_dir),
               **{k: getattr(m, k) for k in ("study", "scheduler", "scaling", "images_per_epoch",
                                              "project_epochs", "warmup_steps", "repeats")},
               "points": points}
    write_json_atomic(study_dir / RESULTS, results)
    return results


# ---- table -----------------------------------------------------------------------------------

def projection_column(results: dict) -> str:
    """The projected-time column's name, e.g. time_90_epochs_hours."""
    return f"time_{results['project_epochs']:g}_epochs_hours"


def columns(results: dict) -> List[str]:
    return [*BASE_COLUMNS, projection_column(results), "warmup_included"]


def _sorted_points(results: dict) -> List[dict]:
    return sorted(results["points"], key=lambda p: (p["nodes"], p["ranks"]))


def efficiency(scaling: str, x: float, n: int, x0: float, n0: int) -> float:
    """Parallel efficiency of X at N nodes against X0 at N0."""
    if scaling == "weak":
        # Per-node throughput kept: equals T(N0)/T(N) at a fixed per-node workload.
        return (x / n) / (x0 / n0)
    # Speed-up over the ideal N/N0; in times T_min*N_min/(T_N*N). Same number as weak, but
    # here the global batch is fixed, so it is the time-to-solution efficiency.
    return x * n0 / (x0 * n)


def table(results: dict) -> List[dict]:
    """One row per point with data, by node count; baseline = smallest node count with data."""
    have = [p for p in _sorted_points(results) if p["n"]]
    if not have:
        return []
    base = baseline(have)
    n0, x0 = base["nodes"], base["images_per_sec"]
    per_epoch, epochs = results["images_per_epoch"], results["project_epochs"]
    proj = projection_column(results)
    rows = []
    for p in have:
        x, n = p["images_per_sec"], p["nodes"]
        # Unknown costs (None) stay None: the projection is then from the step time alone.
        costs = {k: p.get(k) for k in projection.COSTS}
        rows.append({"nodes": n, "ranks": p["ranks"], "global_batch": p["global_batch"],
                     "images_per_sec": x, "images_per_sec_min": p["images_per_sec_min"],
                     "images_per_sec_max": p["images_per_sec_max"], "repeats": p["n"],
                     "speedup": x / x0, "efficiency": efficiency(results["scaling"], x, n, x0, n0),
                     "epoch_seconds": per_epoch / x, **costs,
                     proj: projection.hours(epochs, per_epoch / x, costs),
                     "warmup_included": bool(p.get("warmup_included"))})
    return rows


def baseline(rows: List[dict]) -> dict:
    """The row (or point) the speed-ups are relative to: the smallest node count whose rate
    excludes the warm-up, unless every one includes it."""
    return next((r for r in rows if not r.get("warmup_included")), rows[0])


def missing(results: dict) -> List[dict]:
    """Points without any usable repeat, each with the reasons of its repeats."""
    out = []
    for p in _sorted_points(results):
        if p["n"]:
            continue
        reasons = [f"{r['run_dir']}: {r['reason']}" for r in p["repeats"]]
        out.append({"id": p["id"], "nodes": p["nodes"], "ranks": p["ranks"],
                    "reasons": reasons or ["no run directories in the manifest"]})
    return out


# ---- report ----------------------------------------------------------------------------------

def _below_gate(row: dict) -> bool:
    # A tolerance so an efficiency of exactly 75 % computed in floating point is not flagged.
    return row["efficiency"] < EFFICIENCY_GATE - 1e-9


def csv_text(results: dict, rows: List[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(results), lineterminator="\n")
    w.writeheader()
    for r in rows:
        # repr keeps every digit of a float, so the CSV reads back to the same numbers.
        w.writerow({k: repr(v) if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else v
                    for k, v in r.items()})
    return buf.getvalue()


def markdown(results: dict, rows: List[dict]) -> str:
    lines = [f"# Scaling study {results['study']}: {results['scaling']} scaling", "",
             *_definitions(results, rows), "", *_table_lines(results, rows),
             *_gate_lines(rows), *_accuracy_lines(results), *_missing_lines(results),
             *stragglers.section(results)]
    notes = _notes(results)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _definitions(results: dict, rows: List[dict]) -> List[str]:
    """The baseline, and how each column is measured."""
    base, kind, epochs = baseline(rows), results["scaling"], results["project_epochs"]
    held = ("per-rank batch fixed, global batch grows with the ranks" if kind == "weak"
            else "global batch fixed")
    eff_def = ("(X/N)/(X0/N0)" if kind == "weak" else "X·N0/(X0·N), i.e. T(N0)·N0/(T(N)·N)")
    repeats = results.get("repeats")
    which = (f"with data; it too includes the warm-up, {WARMUP_MARK}" if base["warmup_included"]
             else "with data measured after the warm-up")
    lines = [f"Baseline: {base['nodes']} node(s), {base['ranks']} ranks, "
             f"{base['images_per_sec']:.1f} images/s (the smallest node count {which}).", "",
             f"X = images/s: the median of per-step images/s after {results['warmup_steps']} "
             f"warm-up step(s), then the median over {repeats if repeats else 'the'} repeat(s) "
             f"(min-max shown). {kind.capitalize()} scaling ({held}): speed-up X/X0, "
             f"efficiency {eff_def}. Epoch = {results['images_per_epoch']:,} images; epoch "
             f"time = images per epoch / X, the steps alone. Projected time for {epochs:g} "
             f"epochs = start-up + {epochs:g} × (epoch time + evaluation per epoch + checkpoint "
             f"per epoch), each the median over repeats of what the runs measured (the time "
             f"account in summary.json), with evaluations and checkpoints at the cadence of the "
             f"runs' config.yaml (eval.every_epochs, checkpoint.every_epochs; the last epoch has "
             f"both)."]
    if any(projection.known(r) for r in rows):
        lines += ["", "Evaluation is timed on the study's own validation set, the one its runs "
                      "evaluated (with synthetic data, a few synthetic batches), not on the "
                      "validation set of the training being projected. Checkpoint time is the "
                      "time the training loop waited on checkpoints."]
    return lines


def _seconds(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _table_lines(results: dict, rows: List[dict]) -> List[str]:
    """The table, and a footnote naming the points projected from the step time alone."""
    proj, epochs = projection_column(results), results["project_epochs"]
    lines = [f"| nodes | ranks | global batch | images/s | min-max | repeats | speed-up "
             f"| efficiency | epoch time | eval/epoch (s) | checkpoint/epoch (s) | start-up (s) "
             f"| {epochs:g} epochs (h) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "" if projection.known(r) else f" {STEPS_ONLY}"
        warm = f" {WARMUP_MARK}" if r["warmup_included"] else ""
        lines.append(f"| {r['nodes']} | {r['ranks']} | {r['global_batch']} | "
                     f"{r['images_per_sec']:.1f}{warm} | {r['images_per_sec_min']:.1f}-"
                     f"{r['images_per_sec_max']:.1f} | {r['repeats']} | {r['speedup']:.2f} | "
                     f"{100 * r['efficiency']:.1f} % | {walltime.hms(r['epoch_seconds'])} | "
                     + " | ".join(_seconds(r[k]) for k in projection.COSTS)
                     + f" | {r[proj]:.2f}{mark} |")
    lines += _warmup_lines(results)
    unknown = [p for p in _sorted_points(results) if p["n"] and not projection.known(p)]
    if unknown:
        lines += ["", f"{STEPS_ONLY} From the epoch time alone: start-up, evaluations and "
                      f"checkpoints are not counted, since these runs have no usable time "
                      f"account:", ""]
        lines += [f"- {p['nodes']} node(s): {r['run_dir']}: {r['costs_unknown']}"
                  for p in unknown for r in p["repeats"] if "costs_unknown" in r]
    return lines


def _warmup_lines(results: dict) -> List[str]:
    """The footnote to rates that include the warm-up, and the repeats left out for it."""
    points = [p for p in _sorted_points(results) if p["n"]]
    marked = [p for p in points if p.get("warmup_included")]
    left_out = [p for p in points if p.get("left_out")]
    if not marked and not left_out:
        return []
    why = (f"no step records after the {results['warmup_steps']} warm-up step(s), so "
           "summary.json's whole-run images/s, which includes the warm-up")
    lines = [""]
    if marked:
        lines += [f"{WARMUP_MARK} Includes the warm-up ({why}): not comparable with the other "
                  "points, and no baseline while a point measured after the warm-up exists:", ""]
        lines += [f"- {p['nodes']} node(s): {', '.join(r['run_dir'] for r in p['repeats'] if r['status'] == 'ok')}"
                  for p in marked]
        lines.append("")
    if left_out:
        lines += [f"Left out of the median over repeats ({why}):", ""]
        lines += [f"- {p['nodes']} node(s): " + ", ".join(
            f"{r['run_dir']} ({r['images_per_sec']:.1f} images/s)" for r in p["repeats"]
            if r["run_dir"] in p["left_out"]) for p in left_out]
    return lines


def _gate_lines(rows: List[dict]) -> List[str]:
    low = [r for r in rows if _below_gate(r)]
    lines = ["", f"## Below {100 * EFFICIENCY_GATE:.0f} % efficiency", "", f"{GATE_SOURCE}.", ""]
    return lines + ([f"- {r['nodes']} node(s): {100 * r['efficiency']:.1f} %"
                     + (f" (includes the warm-up, {WARMUP_MARK})" if r["warmup_included"] else "")
                     for r in low]
                    or [f"None: every point reaches {100 * EFFICIENCY_GATE:.0f} %."])


def _accuracy_lines(results: dict) -> List[str]:
    """The verdict per optimizer (the name in the runs' summary.json) from their top-1."""
    ok = [(r.get("optimizer") or "optimizer unknown", p["global_batch"], r.get("top1"))
          for p in _sorted_points(results) for r in p["repeats"] if r["status"] == "ok"]
    lines = ["", "## Accuracy", ""]
    if not any(top1 is not None for _, _, top1 in ok):
        return lines + ["No accuracy measured: the runs did not evaluate (their summary.json "
                        "has no top1)."]
    return lines + [f"- {v}" for v in accuracy.verdict(ok)]


def _missing_lines(results: dict) -> List[str]:
    gone = missing(results)
    partial = [(p, r) for p in _sorted_points(results) if p["n"]
               for r in p["repeats"] if r["status"] != "ok"]
    lines = ["", "## Missing points and repeats", ""]
    if not gone and not partial:
        lines.append("None: every repeat has a usable summary.json.")
    for m in gone:
        lines.append(f"- point {m['id']} ({m['nodes']} node(s)), no data:")
        lines += [f"  - {why}" for why in m["reasons"]]
    for p, r in partial:
        lines.append(f"- point {p['id']} ({p['nodes']} node(s)), repeat {r['run_dir']} "
                     f"{r['status']}: {r['reason']}")
    return lines


def _notes(results: dict) -> List[str]:
    kind = results["scaling"]
    batches = {p["global_batch" if kind == "strong" else "per_rank_batch"]
               for p in results["points"] if p["n"]}
    notes = []
    if len(batches) > 1:
        notes.append(f"The {'global' if kind == 'strong' else 'per-rank'} batch differs between "
                     f"points ({', '.join(map(str, sorted(batches, key=str)))}): this is not a "
                     f"clean {kind}-scaling series.")
    # `study submit --retry-failed` counts its retries in the manifest's job records.
    for p in results["points"]:
        job = p.get("job") or {}
        if job.get("retries"):
            notes.append(f"Point {p['id']} was retried {job['retries']} time(s) (earlier job(s) "
                         f"{', '.join(job.get('earlier') or ())}); its runs resumed from their checkpoints.")
    return notes


def chart(results: dict, rows: List[dict], path: Path) -> None:
    """Images/s (log-log, min-max bars, ideal line) and efficiency against nodes."""
    # Imported here: matplotlib is optional (report() goes on without the chart) and slow to load.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    nodes = [r["nodes"] for r in rows]
    x = [r["images_per_sec"] for r in rows]
    err = [[r["images_per_sec"] - r["images_per_sec_min"] for r in rows],
           [r["images_per_sec_max"] - r["images_per_sec"] for r in rows]]
    eff = [100 * r["efficiency"] for r in rows]
    base = baseline(rows)
    n0, x0 = base["nodes"], base["images_per_sec"]
    ticks = sorted(set(nodes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        left.plot(ticks, [x0 * n / n0 for n in ticks], color="gray", linestyle=":",
                  label="ideal X0·N/N0")
        left.errorbar(nodes, x, yerr=err, fmt="o-", color="tab:blue", capsize=4,
                      label="measured (median, min-max)")
        left.set_yscale("log")
        left.set_ylabel("images/s")
        left.set_title(f"{results['study']}: throughput ({results['scaling']} scaling)",
                       fontsize=10)
        left.legend(fontsize=8)
        right.axhline(100, color="gray", linestyle=":", label="ideal 100 %")
        right.axhline(100 * EFFICIENCY_GATE, color="tab:red", linestyle="--",
                      label=f"{100 * EFFICIENCY_GATE:.0f} % gate")
        right.plot(nodes, eff, "o-", color="tab:blue", label="measured")
        right.set_ylim(0, max(110, max(eff) * 1.1))
        right.set_ylabel("parallel efficiency (%)")
        right.set_title(f"{results['study']}: efficiency ({results['scaling']} scaling)",
                        fontsize=10)
        right.legend(fontsize=8, loc="lower left")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            # The node counts themselves as ticks, not powers of two the study did not run.
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(n) for n in ticks])
            ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
            ax.set_xlabel("nodes")
            ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def report(study_dir, out=None) -> Dict[str, Path]:
    """Collect afresh, then write scaling.csv, scaling.md and scaling.png; returns their paths.
    A convergence study's report is :func:`.accuracy_report.report`'s."""
    study_dir = Path(study_dir)
    if Manifest.load(study_dir).kind == "convergence":
        return accuracy_report.report(study_dir, out)
    results = collect(study_dir)
    rows = table(results)
    if not rows:
        problems = sum(r["status"] == "problem" for p in results["points"] for r in p["repeats"])
        extra = (f" ({problems} repeat(s) have a summary.json that could not be used: see "
                 f"{study_dir / RESULTS})" if problems else "")
        raise UserError(f"no point of study {results['study']} has a summary.json yet{extra}; "
                        f"run `knl-train study status {study_dir}` to see the jobs")
    out = Path(out) if out is not None else study_dir / "report"
    paths = {"results": study_dir / RESULTS, "csv": out / "scaling.csv",
             "md": out / "scaling.md", "png": out / "scaling.png"}
    write_text_atomic(paths["csv"], csv_text(results, rows))
    write_text_atomic(paths["md"], markdown(results, rows))
    try:
        chart(results, rows, paths["png"])
    except ImportError as e:
        warnings.warn(f"matplotlib is not available ({e}): {paths['png']} not drawn")
        del paths["png"]
    return paths
