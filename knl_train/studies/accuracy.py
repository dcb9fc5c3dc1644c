"""A convergence study's numbers: each point's run read back, then the best LR per optimizer and
global batch, and the verdict.

A point is one run (optimizer label, global batch, peak LR at the reference batch, repeat): its
final top-1/top-5 from ``summary.json``, its curve, best accuracy and time to ``target_top1``
from ``metrics.jsonl``, and for a run without a usable summary the reason, its job's output file
and the last error in it. The best LR per optimizer and batch has the highest mean final top-1
among the LRs whose every repeat gave a usable run: an LR with a diverged, failed, damaged or
missing repeat is chosen only when no LR has all its repeats usable (one stable run out of three
must not beat three), and then the largest share of usable repeats comes first.
:func:`verdict` (the scaling report's too) names the largest batch within one point of the
smallest batch's accuracy. ``accuracy_report`` writes the files, ``accuracy_charts`` draws.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional, Tuple

from knl_train import records
from knl_train.atomic import write_json_atomic
from knl_train.studies import joboutput
from knl_train.studies.manifest import Manifest, PointRecord

RESULTS = "results.json"
HOLD = 0.01            # the verdict's tolerance: one point of top-1 (accuracies are fractions)
# Job states after which a point without summary.json will not get one.
ENDED = ("completed", "failed", "timeout", "cancelled", "submit-failed")
# The divergence guard's message (train.control), looked for in a point's job output.
NONFINITE = "the loss is not finite"
Curve = List[Tuple[int, float, Optional[float], Optional[float]]]


# ---- collect ---------------------------------------------------------------------------------

def _num(x) -> Optional[float]:
    """A finite number as float, else None (NaN must not reach results.json)."""
    return float(x) if records.is_number(x) else None


@dataclass
class _Metrics:
    """What ``metrics.jsonl`` says: the curve (epoch, top1, top5, wall seconds), the first step
    whose loss is not finite, whether the run restarted, why the file cannot be used, and a note
    when its last line was cut short and left out."""
    curve: Curve = field(default_factory=list)
    nonfinite: Optional[int] = None
    restarted: bool = False
    problem: Optional[str] = None
    note: Optional[str] = None


def _cut_short(path: Path) -> Optional[int]:
    """The number of the file's last line if its write was cut short (a killed process): no
    newline ends it and it is not JSON. A complete record without its newline is kept."""
    data = path.read_bytes()
    last = data.rpartition(b"\n")[2]
    if not last.strip():
        return None
    try:
        json.loads(last)
    except ValueError:
        return data.count(b"\n") + 1
    return None


def _curve(path: Path, rel: str, cut: bool) -> _Metrics:
    """The evaluated epochs, first non-finite step and restart; ValueError names a bad line
    (a last line cut short is left out when ``cut``).

    A resumed run's process starts its clock again, so its record is less than the epoch's
    training time after the last one: wall times add each process's last one. An epoch written
    twice keeps the later.
    """
    by_epoch: Dict[int, tuple] = {}
    nonfinite, offset, last, restarted = None, 0.0, None, False
    for rec in records.read_metrics(path, rel, kinds=("step", "epoch"), cut_short_ok=cut):
        if nonfinite is None and rec.loss is not None and _num(rec.loss) is None:
            nonfinite = rec.step
        if rec.kind != "epoch":
            continue
        wall = _num(rec.wall_seconds)
        if wall is not None:
            if last is not None and wall - last < (_num(rec.epoch_seconds) or 0.0):
                offset, restarted = offset + last, True
            last = wall
        top1 = _num(rec.val_top1)
        if top1 is not None and records.is_integer(rec.epoch):
            by_epoch[rec.epoch] = (rec.epoch, top1, _num(rec.val_top5),
                                   None if wall is None else offset + wall)
    return _Metrics([by_epoch[e] for e in sorted(by_epoch)], nonfinite, restarted)


def _metrics(study_dir: Path, rel: str) -> _Metrics:
    """Read ``metrics.jsonl`` (none yet is an empty curve); a bad line in the middle is a problem,
    a last line cut short by an interrupted write is left out and noted."""
    mrel = f"{rel}/{records.METRICS}"
    path = study_dir / mrel
    if not path.is_file():
        return _Metrics()
    try:
        cut = _cut_short(path)
        got = _curve(path, mrel, cut is not None)
    except (OSError, UnicodeDecodeError) as e:
        return _Metrics(problem=f"{mrel}: {e}")
    except ValueError as e:
        return _Metrics(problem=str(e))
    if cut is not None:
        got.note = f"{mrel} line {cut} was cut short (an interrupted write) and is left out"
    return got


def _job(point: PointRecord) -> Tuple[Optional[str], str]:
    """The point's last known job state, and a note naming the job."""
    job = point.job
    if job is None:
        return None, "no job recorded in the manifest"
    note = f"job {job.id + ' ' if job.id else ''}{job.state or 'state unknown'}"
    return job.state, note + (f": {job.error}" if job.state == "submit-failed" and job.error
                              else "")


def _output_note(output: Optional[joboutput.JobOutput], rel_out: Optional[str],
                 point_dir: str) -> str:
    """Where an ended job's output is, and the last error it printed."""
    if output is None:
        return f"; no job output in {point_dir}"
    error = output.error
    return f'; {rel_out} says "{error}"' if error else f"; see {rel_out}"


def _without_summary(point: PointRecord, m: _Metrics, output, rel_out, point_dir: str) -> dict:
    state, note = _job(point)
    if m.nonfinite is not None or (output is not None and output.says(NONFINITE)):
        at = f" at step {m.nonfinite}" if m.nonfinite is not None else ""
        return {"status": "diverged", "reason": f"the loss is not finite{at}; no summary.json; "
                f"{note}{'' if output is None else _output_note(output, rel_out, point_dir)}"}
    if state in ENDED:
        where = "" if state == "submit-failed" else _output_note(output, rel_out, point_dir)
        return {"status": "failed", "reason": f"no summary.json; {note}{where}"}
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


def _measured(study_dir: Path, rel: str, point: PointRecord, target, m: _Metrics) -> dict:
    """A run with a summary.json: its accuracy and time to target, or why it has none."""
    summary, bad = _summary(study_dir, rel, point)
    if bad:
        return bad
    out = {"updates": summary.steps if records.is_integer(summary.steps) else None,
           "wall_seconds": _num(summary.wall_seconds),
           "resumed": m.restarted or records.is_integer(summary.resumed_from_step)}
    top1 = _num(summary.top1)
    if top1 is None:
        if m.nonfinite is not None or (summary.train_loss is not None
                                       and _num(summary.train_loss) is None):
            return {**out, "status": "diverged", "reason": f"{rel}: the loss is not finite"
                    + (f" at step {m.nonfinite}" if m.nonfinite is not None else "")}
        return {**out, "status": "problem", "reason": f"{rel}/{records.SUMMARY} has no top-1: "
                                                      "the run did not evaluate"}
    if m.problem:
        return {**out, "status": "problem", "reason": m.problem}
    top5 = _num(summary.top5)
    top5s = [v for v in [top5, *(c[2] for c in m.curve)] if v is not None]
    epochs, seconds, reached = _to_target(m.curve, target)
    return {**out, "status": "ok", "reason": None, "top1": top1, "top5": top5,
            "best_top1": max([top1, *(c[1] for c in m.curve)]),
            "best_top5": max(top5s, default=None), "epochs_to_target": epochs,
            "seconds_to_target": seconds, "target_reached": reached}


def _run(study_dir: Path, point: PointRecord, target: Optional[float]) -> dict:
    """One point's run: its accuracy, curve and time to target, or why it has none."""
    rel = point.run_dirs[0] if point.run_dirs else None
    out = {"run_dir": rel, "output": None, "status": "missing",
           "reason": "no run directory in the manifest", "top1": None, "top5": None,
           "best_top1": None, "best_top5": None, "epochs_to_target": None,
           "seconds_to_target": None, "target_reached": None, "updates": None,
           "wall_seconds": None, "resumed": False, "curve": []}
    if rel is None:
        return out
    point_dir = str(PurePosixPath(rel).parent)
    output = joboutput.read(study_dir / point_dir)
    rel_out = None if output is None else f"{point_dir}/{output.path.name}"
    m = _metrics(study_dir, rel)
    out.update(output=rel_out, curve=[list(c) for c in m.curve], resumed=m.restarted)
    if (study_dir / rel / records.SUMMARY).is_file():
        out.update(_measured(study_dir, rel, point, target, m))
    else:
        out.update(_without_summary(point, m, output, rel_out, point_dir))
    if m.note:
        out["reason"] = f"{out['reason']}; {m.note}" if out["reason"] else m.note
    return out


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

def groups(results: dict) -> Dict[tuple, Dict[float, List[dict]]]:
    """Points by (optimizer, global batch), then by LR ascending, then repeat."""
    out: Dict[tuple, Dict[float, List[dict]]] = {}
    for p in sorted(results["points"], key=lambda p: (str(p["optimizer"]), p["global_batch"],
                                                      p["lr"] or 0.0, p["repeat"] or 0)):
        out.setdefault((p["optimizer"], p["global_batch"]), {}).setdefault(p["lr"], []).append(p)
    return out


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def number(x) -> str:
    """A number as ``%g`` (an LR), a dash for none."""
    return "—" if x is None else f"{x:g}"


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _lr_label(lr, runs: List[dict]) -> str:
    ok = [r for r in runs if r["status"] == "ok"]
    if ok:
        part = "" if len(ok) == len(runs) else f" ({len(ok)} of {len(runs)} runs)"
        return f"{number(lr)}: {100 * _mean(r['top1'] for r in ok):.1f} %{part}"
    statuses = {r["status"] for r in runs}
    # The worst news first: one diverged repeat makes the LR "diverged".
    return f"{number(lr)}: " + next((s for s in ("diverged", "failed", "problem", "missing")
                                     if s in statuses), "no data")


def _best_lr(by_lr: Dict[float, List[dict]]) -> Optional[float]:
    """Among the LRs with the largest share of usable repeats (every repeat, when any LR has
    that), the one with the highest mean final top-1 over them; None: no usable run at all."""
    best, best_key = None, None
    for lr, runs in by_lr.items():   # ascending (groups): a tie keeps the smaller LR
        ok = [r["top1"] for r in runs if r["status"] == "ok"]
        key = (len(ok) / len(runs), _mean(ok)) if ok else None
        if key is not None and (best_key is None or key > best_key):
            best, best_key = lr, key
    return best


def _row(optimizer: str, batch: int, by_lr: Dict[float, List[dict]], target) -> dict:
    best = _best_lr(by_lr)
    row = {"optimizer": optimizer, "global_batch": batch, "best_lr": best,
           "best_lr_runs": len(by_lr.get(best, [])),
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
    every LR tried. ``repeats`` counts the best LR's usable runs, ``best_lr_runs`` all of them
    (fewer usable: no LR had every repeat usable). Rows without any usable run are kept (their
    LRs say why)."""
    return [_row(opt, batch, by_lr, results.get("target_top1"))
            for (opt, batch), by_lr in groups(results).items()]


# ---- verdict ---------------------------------------------------------------------------------

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
                    sep.format(pct(acc[b]), f"{100 * (acc[b] - acc[base]):+.1f} points"))
        if broke is None and held == base:
            lines.append(f"{label}: only global batch {base} measured "
                         f"({pct(acc[base])}){note}")
        elif broke is None:
            lines.append(f"{label}: holds its accuracy up to global batch {held} "
                         f"({pct(acc[held])} vs {pct(acc[base])} at {base}){note}")
        else:
            first = f" (at {broke}: {at(broke, '{}, {}')})" if broke != largest else ""
            lines.append(f"{label}: within 1 point only up to {held}{first}; at {largest} "
                         f"{at(largest, '{} ({})')} vs {pct(acc[base])} at {base}{note}")
    return lines


def row_verdict(rows: List[dict]) -> List[str]:
    """The verdict on the table's rows: each optimizer's best LR per global batch."""
    return verdict((r["optimizer"], r["global_batch"], r["top1"]) for r in rows)
