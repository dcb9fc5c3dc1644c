"""Time-to-train: the demo's wall clock, where it goes, and a plain Horovod Keras program beside it.

    .venv/bin/python benchmarks/bench_time_to_train.py --label after     # idle machine, ~15 min
    .venv/bin/python benchmarks/bench_time_to_train.py --label before \\
        --knl-train /work/before/.venv/bin/knl-train                   # an older checkout
    .venv/bin/python benchmarks/bench_time_to_train.py --smoke --label after   # ~4 min check

Each round runs, in an order that rotates from round to round:
- the ``make demo`` run (``knl-train launch -np 2 -- knl-train train --fresh --config
  jobs/train/demo.yaml``, LARS) at 3, 5 and 6 epochs, and the same with momentum SGD
  (``optimizer.name=sgd``, ``schedule.peak_lr=0.1``: the demo's LARS peak of 8 is a trust-ratio
  scale, far too large for SGD) at 5 epochs, and at 3 and 6 unless ``--no-sgd-marginal``;
- the peer, ``peer_horovod_keras.py`` at 5 epochs, under the launcher's own mpirun line (its
  binding and MCA options, read from ``knl-train launch --dry-run``) without knl-train's preset;
- the floor: ``python -c "import tensorflow"``, alone and as 2 ranks under the same mpirun line.

Every run's wall clock is timed from outside, launch to exit. With knl-train's ``summary.json``
and ``metrics.jsonl`` it reports:
- the marginal wall seconds per epoch, (wall at 6 - wall at 3) / 3, against the epoch's pure
  step time (images per epoch / the summary's steady ``images_per_sec``), round by round;
- start-up: the summary's ``startup_seconds`` and ``startup`` phases when the trainer writes
  them (process start to the end of the first step; the target is judged on it), and launch to
  first step from outside (the "step 10" line's arrival less 9 steady steps, from the step-20
  record: an estimate, and the only one for a trainer without the summary's account);
- epoch boundaries: the time between two "epoch N/M" lines less the later epoch's training
  seconds (evaluation, checkpoint, restart), and that less the evaluation: the epoch record's
  ``eval_seconds`` if written, else (no verdict) the summary's ``eval_seconds`` / ``evaluations``,
  whose mean includes the first evaluation's tracing;
- ``time_to_train_efficiency``: the summary's, and images / steady images/s / the outside wall;
- the 5-epoch wall clocks of knl-train (LARS, SGD) and the peer, and their ratios per round.
Medians over rounds, with min-max.

Results go to ``benchmarks/results/time_to_train.{json,md}`` under ``--label`` (before or
after); rerunning one label keeps the other's section, so the files hold both side by side.
``--smoke`` runs 1 round of short runs into ``time_to_train.smoke.*`` (not results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import host, load_note

from knl_train.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEER = Path(__file__).resolve().with_name("peer_horovod_keras.py")
LABELS = ("before", "after")
TARGETS = {"marginal_over_pure": 1.15, "boundary_minus_eval_seconds": 0.5,
           "launch_to_first_step_seconds": 4.0, "efficiency": 0.85,
           "sgd_wall_over_peer": 0.85, "lars_wall_over_peer": 1.0}
SGD = ["optimizer.name=sgd", "schedule.peak_lr=0.1"]
# knl-train's start-up phases in order (knl_train/train/clock.py); the peer reports the same.
PHASES = ("imports", "horovod", "data", "model", "first_step")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) ")
STEP_LINE = re.compile(r"\s*step\s+(\d+)\s+epoch ")


# ---- one run ----------------------------------------------------------------------------------
def run_timed(argv, log: Path, cwd: Path):
    """Run ``argv`` to its end: (wall seconds, [(seconds since launch, stdout line)])."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    lines = []
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for text in proc.stdout:
            lines.append((time.perf_counter() - t0, text))
            f.write(text)
        code = proc.wait()
        wall = time.perf_counter() - t0
    if code:
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed ({code}): {shlex.join(argv)}\n(log {log})\n{tail}")
    return wall, lines


def read_metrics(path: Path):
    """(step records by step, epoch records in order) from metrics.jsonl (tolerant of any kind)."""
    steps, epochs = {}, []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "step":
                steps[rec["step"]] = rec
            elif rec.get("kind") == "epoch":
                epochs.append(rec)
    return steps, epochs


def first_step_from_outside(lines, steps):
    """Launch to the end of the first step: the "step 10" line's arrival less 9 steady steps
    (the step-20 record's seconds per step); None if the run's log does not allow it."""
    arrival = next((t for t, text in lines if (m := STEP_LINE.match(text)) and m[1] == "10"), None)
    later = steps.get(20, {}).get("step_seconds")
    return None if arrival is None or later is None else arrival - 9 * later


def boundaries(lines, epochs, eval_mean):
    """Per epoch boundary after the first: (seconds from one epoch's end line to the next less
    the later epoch's training seconds, that epoch's evaluation seconds). The first is what a
    boundary costs (evaluation, checkpoint, restarting the input); the evaluation is the epoch
    record's ``eval_seconds`` when the trainer writes one, else the run's mean (``eval_mean``,
    which includes the first evaluation's tracing), else None."""
    ends = [t for t, text in lines if EPOCH_LINE.match(text)]
    secs = [e.get("epoch_seconds") for e in epochs]
    if len(ends) != len(secs) or None in secs:
        return []
    evals = [e.get("eval_seconds", eval_mean) for e in epochs]
    return [(b - a - s, ev) for a, b, s, ev in zip(ends, ends[1:], secs[1:], evals[1:])]


def knl_train_run(ctx, epochs: int, sets, tag: str) -> dict:
    """One ``make demo`` run at ``epochs`` epochs with extra ``--set``s; its timings."""
    run_dir = ctx.work / tag
    train = [ctx.knl, "train", "--fresh", "--config", str(ctx.config),
             "--set", f"data.path={ctx.data}", "--set", f"run_dir={run_dir}",
             "--set", f"epochs={epochs}", *[a for s in sets for a in ("--set", s)]]
    wall, lines = run_timed([ctx.knl, "launch", "-np", str(ctx.ranks), "--", *train],
                            ctx.work / f"{tag}.log", ctx.checkout)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps, epoch_recs = read_metrics(run_dir / "metrics.jsonl")
    images = summary.get("images_trained") or summary["steps"] * summary["global_batch"]
    rate = summary["images_per_sec"]
    eval_mean = (summary["eval_seconds"] / summary["evaluations"]
                 if summary.get("eval_seconds") is not None and summary.get("evaluations") else None)
    return {
        "wall": wall, "images": images, "images_per_sec": rate,
        "images_per_epoch": summary["steps"] // summary["epochs"] * summary["global_batch"],
        "efficiency_outside": images / rate / wall,
        "launch_and_exit": wall - summary["wall_seconds"],  # outside the rank's own clock
        "launch_to_first_step": first_step_from_outside(lines, steps),
        "boundaries": boundaries(lines, epoch_recs, eval_mean), "eval_mean": eval_mean,
        "eval_per_epoch": any("eval_seconds" in e for e in epoch_recs),
        "summary": {k: summary.get(k) for k in (
            "wall_seconds", "startup_seconds", "startup", "train_seconds", "eval_seconds",
            "checkpoint_seconds", "other_seconds", "wall_images_per_sec",
            "time_to_train_efficiency", "images_per_sec", "epochs", "steps", "global_batch",
            "evaluations", "checkpoints", "optimizer", "versions")},
    }


def peer_run(ctx, epochs: int, tag: str) -> dict:
    out = ctx.work / f"{tag}.json"
    argv = [*ctx.mpirun, ctx.python, str(PEER), "--data", str(ctx.data), "--epochs", str(epochs),
            "--checkpoint-dir", str(ctx.work / tag), "--out", str(out)]
    wall, _ = run_timed(argv, ctx.work / f"{tag}.log", ctx.work)
    peer = json.loads(out.read_text())
    return {"wall": wall, "images_per_sec": peer["images_per_sec"],
            "efficiency_outside": peer["images_trained"] / peer["images_per_sec"] / wall,
            "peer": peer}


def floor_run(ctx, under_mpirun: bool, tag: str) -> dict:
    argv = [ctx.python, "-c", "import tensorflow"]
    wall, _ = run_timed([*ctx.mpirun, *argv] if under_mpirun else argv,
                        ctx.work / f"{tag}.log", ctx.work)
    return {"wall": wall}


def peer_mpirun(knl: str, ranks: int):
    """The launcher's mpirun line up to its ``knl-train exec`` wrapper, without the settings it
    hands knl-train's ranks (``-x NAME=VALUE``); pass-through ``-x NAME`` stays."""
    dry = subprocess.run([knl, "launch", "-np", str(ranks), "--dry-run", "--", "true"],
                         capture_output=True, text=True, check=True).stdout
    argv = shlex.split([line for line in dry.splitlines() if line.strip()][-1])
    cut = next(i for i in range(len(argv) - 1)
               if Path(argv[i]).name == "knl-train" and argv[i + 1] == "exec")
    out, i = [], 0
    while i < cut:
        if argv[i] == "-x" and "=" in argv[i + 1]:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


# ---- rounds ---------------------------------------------------------------------------------
def plan(args):
    """The runs of one round: (name, function of (ctx, tag))."""
    lo, hi = args.marginal_epochs
    n = args.compare_epochs
    runs = [(f"lars-{lo}", lambda c, t: knl_train_run(c, lo, [], t)),
            (f"lars-{hi}", lambda c, t: knl_train_run(c, hi, [], t)),
            (f"lars-{n}", lambda c, t: knl_train_run(c, n, [], t)),
            (f"sgd-{n}", lambda c, t: knl_train_run(c, n, SGD, t)),
            (f"peer-{n}", lambda c, t: peer_run(c, n, t)),
            ("import-tf", lambda c, t: floor_run(c, False, t)),
            ("import-tf-mpirun", lambda c, t: floor_run(c, True, t))]
    if args.sgd_marginal:
        runs[2:2] = [(f"sgd-{lo}", lambda c, t: knl_train_run(c, lo, SGD, t)),
                     (f"sgd-{hi}", lambda c, t: knl_train_run(c, hi, SGD, t))]
    return list(dict(runs).items())  # one run per name (the compared epochs may be lo or hi)


def run_rounds(ctx, runs, rounds: int):
    """Every run once per round, each round starting one run further on."""
    results = {name: [] for name, _ in runs}
    for r in range(rounds):
        for name, fn in runs[r % len(runs):] + runs[:r % len(runs)]:
            load = os.getloadavg()[0]
            res = fn(ctx, f"{name}.{r}")
            res["load"] = round(load, 2)
            results[name].append(res)
            print(f"  round {r + 1}/{rounds}: {name:18s} {res['wall']:7.2f} s wall"
                  f"  (load {load:.2f})", file=sys.stderr, flush=True)
    return results


# ---- summaries ------------------------------------------------------------------------------
def stats(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "samples": [round(v, digits) for v in values]}


def col(res, name, key):
    return [r.get(key) for r in res.get(name, [])]


def marginal(res, opt, lo, hi):
    """Per round: (wall_hi - wall_lo) / (hi - lo) against the epoch's pure step time."""
    a, b = res.get(f"{opt}-{lo}"), res.get(f"{opt}-{hi}")
    if not a or not b:
        return None
    extra = [(y["wall"] - x["wall"]) / (hi - lo) for x, y in zip(a, b)]
    pure = [x["images_per_epoch"] / ((x["images_per_sec"] + y["images_per_sec"]) / 2)
            for x, y in zip(a, b)]
    return {"marginal_seconds_per_epoch": stats(extra), "pure_step_seconds_per_epoch": stats(pure),
            "ratio": stats([e / p for e, p in zip(extra, pure)]),
            "target": TARGETS["marginal_over_pure"]}


def startup(res, names):
    """Start-up over the given knl-train runs: the summary's, its phases, and from outside."""
    rows = [r for n in names for r in res.get(n, [])]
    phases = {}
    for r in rows:
        for k, v in (r["summary"].get("startup") or {}).items():
            phases.setdefault(k, []).append(v)
    return {"startup_seconds": stats([r["summary"].get("startup_seconds") for r in rows]),
            "phases": {k: stats(v) for k, v in phases.items()},
            "launch_to_first_step_outside": stats([r["launch_to_first_step"] for r in rows]),
            "target": TARGETS["launch_to_first_step_seconds"]}


def boundary_stats(res, names):
    rows = [r for n in names for r in res.get(n, [])]
    worst = [max(b for b, _ in r["boundaries"]) for r in rows if r["boundaries"]]
    over = [max(b - ev for b, ev in r["boundaries"]) for r in rows
            if r["boundaries"] and all(ev is not None for _, ev in r["boundaries"])]
    return {"eval_per_epoch": bool(rows) and all(r["eval_per_epoch"] for r in rows),
            "all": stats([b for r in rows for b, _ in r["boundaries"]]),
            "worst_per_run": stats(worst), "eval_mean": stats([r["eval_mean"] for r in rows]),
            "worst_minus_eval": stats(over), "target": TARGETS["boundary_minus_eval_seconds"]}


def walls(res, n):
    """The n-epoch wall clocks and their ratios to the peer's, round by round."""
    peer = col(res, f"peer-{n}", "wall")
    out = {"peer": stats(peer)}
    for opt in ("lars", "sgd"):
        mine = col(res, f"{opt}-{n}", "wall")
        out[opt] = stats(mine)
        out[f"{opt}_over_peer"] = stats([m / p for m, p in zip(mine, peer)])
        out[f"{opt}_target"] = TARGETS[f"{opt}_wall_over_peer"]
    out["lars_launch_and_exit"] = stats(col(res, f"lars-{n}", "launch_and_exit"))
    return out


def summarize(res, args) -> dict:
    lo, hi, n = *args.marginal_epochs, args.compare_epochs
    knl_runs = [k for k in res if k.split("-")[0] in ("lars", "sgd")]
    peers = res.get(f"peer-{n}", [])
    return {
        "marginal": {opt: marginal(res, opt, lo, hi) for opt in ("lars", "sgd")},
        "startup": {opt: startup(res, [k for k in knl_runs if k.startswith(opt)])
                    for opt in ("lars", "sgd")},
        "boundaries": {opt: boundary_stats(res, [k for k in knl_runs if k.startswith(opt)])
                       for opt in ("lars", "sgd")},
        "efficiency": {opt: {"summary": stats([r["summary"].get("time_to_train_efficiency")
                                               for r in res.get(f"{opt}-{n}", [])]),
                             "outside": stats(col(res, f"{opt}-{n}", "efficiency_outside"))}
                       for opt in ("lars", "sgd")} | {
            "peer": {"outside": stats(col(res, f"peer-{n}", "efficiency_outside"))},
            "target": TARGETS["efficiency"]},
        "steady_images_per_sec": {k: stats(col(res, k, "images_per_sec"), 1)
                                  for k in res if not k.startswith("import")},
        "wall": walls(res, n),
        "peer": {"first_step_seconds": stats([p["peer"]["first_step_seconds"] for p in peers]),
                 "median_step_images_per_sec": stats(
                     [p["peer"]["median_step_images_per_sec"] for p in peers], 1),
                 "startup": {k: stats([p["peer"]["startup"].get(k) for p in peers])
                             for k in (peers[0]["peer"]["startup"] if peers else {})}},
        "floor": {"import_tensorflow": stats(col(res, "import-tf", "wall")),
                  "import_tensorflow_mpirun": stats(col(res, "import-tf-mpirun", "wall"))},
    }


# ---- Markdown -------------------------------------------------------------------------------
def cell(s, digits=2):
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def verdict(s, target, at_most=True):
    if not s:
        return ""
    return " ✓" if (s["median"] <= target if at_most else s["median"] >= target) else " ✗"


def first(*values):
    return next((v for v in values if v), None)


def headline(sec):
    """(metric, target text, cell) rows of one label's summary: the targets, then the facts."""
    m, st, b, e, w = (sec["summary"][k] for k in ("marginal", "startup", "boundaries",
                                                    "efficiency", "wall"))
    fl, peer = sec["summary"]["floor"], sec["summary"]["peer"]
    n, rate = sec["compare_epochs"], sec["summary"]["steady_images_per_sec"]
    rows = []
    for opt in ("lars", "sgd"):
        r = m[opt] and m[opt]["ratio"]
        rows.append((f"marginal wall / pure step time per epoch, {opt.upper()}", "≤ 1.15",
                     cell(r) + verdict(r, TARGETS["marginal_over_pure"])))
        rows.append((f"marginal s/epoch; pure step s/epoch, {opt.upper()}", "",
                     f"{cell(m[opt] and m[opt]['marginal_seconds_per_epoch'])}; "
                     f"{cell(m[opt] and m[opt]['pure_step_seconds_per_epoch'])}"))
    x = b["lars"]["worst_minus_eval"]
    exact = b["lars"].get("eval_per_epoch")  # else less the mean evaluation: no verdict
    rows += [("worst epoch boundary less its evaluation (s), LARS", "≤ 0.5",
              cell(x) + (verdict(x, TARGETS["boundary_minus_eval_seconds"]) if exact
                         else " (less the mean evaluation)" if x else "")),
             ("worst epoch boundary incl. evaluation (s); mean evaluation (s), LARS", "",
              f"{cell(b['lars']['worst_per_run'])}; {cell(b['lars']['eval_mean'])}")]
    out, inside = st["lars"]["launch_to_first_step_outside"], st["lars"]["startup_seconds"]
    rows += [("launch → first step: from outside; summary `startup_seconds` (s), LARS", "≤ 4",
              f"{cell(out)}; {cell(inside)}"
              + verdict(first(inside, out), TARGETS["launch_to_first_step_seconds"])),
             ("peer: process start → first step (s)", "", cell(peer["first_step_seconds"])),
             ("floor: `python -c \"import tensorflow\"` (s); 2 ranks under mpirun", "",
              f"{cell(fl['import_tensorflow'])}; {cell(fl['import_tensorflow_mpirun'])}")]
    for opt in ("lars", "sgd"):
        x, y = e[opt]["summary"], e[opt]["outside"]
        rows.append((f"time_to_train_efficiency, {n} epochs, {opt.upper()}: summary; outside",
                     "≥ 0.85" if opt == "lars" else "", f"{cell(x)}; {cell(y)}"
                     + (verdict(first(x, y), TARGETS["efficiency"], False) if opt == "lars" else "")))
    rows.append(("peer efficiency (outside)", "", cell(e["peer"]["outside"])))
    for opt, target in (("sgd", "≤ 0.85"), ("lars", "≤ 1.0")):
        x = w[f"{opt}_over_peer"]
        rows.append((f"{n}-epoch wall / peer's, {opt.upper()}", target,
                     cell(x) + verdict(x, w[f"{opt}_target"])))
    rows += [(f"{n}-epoch wall (s): LARS; SGD; peer", "",
              f"{cell(w['lars'], 1)}; {cell(w['sgd'], 1)}; {cell(w['peer'], 1)}"),
             (f"{n}-epoch wall outside less the summary's `wall_seconds` (s), LARS", "",
              cell(w.get("lars_launch_and_exit"))),
             ("steady images/s: LARS; SGD; peer (its median step)", "",
              f"{cell(rate.get(f'lars-{n}'), 0)}; {cell(rate.get(f'sgd-{n}'), 0)}; "
              f"{cell(rate.get(f'peer-{n}'), 0)} ({cell(peer['median_step_images_per_sec'], 0)})")]
    return rows


def describe(sec):
    m = sec["machine"]
    versions = next((r["summary"]["versions"] for rs in sec["runs"].values() for r in rs
                     if r.get("summary", {}).get("versions")), {})
    return (f"**{sec['label']}**: knl-train `{sec['measured']['knl_train']}` (commit "
            f"{sec['measured']['commit'] or '?'}); {m['cpu']}, {m['cpus_available']} CPUs available, "
            f"TF {versions.get('tensorflow', '?')}, Horovod {versions.get('horovod', '?')}; load "
            f"average {sec['load_before']} before, {sec['load_after']} after; {m['date']}; "
            f"{sec['rounds']} round(s), {sec['total_seconds']:.0f} s"
            + (" (SMOKE RUN: not results)" if sec["smoke"] else "") + ".")


def phase_table(sec):
    """Start-up seconds per phase: knl-train's summary ``startup`` beside the peer's."""
    st, peer = sec["summary"]["startup"], sec["summary"]["peer"]["startup"]
    found = [*st["lars"]["phases"], *st["sgd"]["phases"], *peer]
    names = [k for k in PHASES if k in found] + sorted(set(found) - set(PHASES))
    if not names:
        return []
    lines = ["| start-up phase (s) | LARS | SGD | peer |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {cell(st['lars']['phases'].get(k))} | {cell(st['sgd']['phases'].get(k))} "
              f"| {cell(peer.get(k))} |" for k in names]
    return lines + [""]


def run_table(sec):
    lines = ["| run | wall s | steady img/s | load before |", "|---|---:|---:|---:|"]
    kinds = ("lars", "sgd", "peer", "import")
    order = sorted(sec["runs"], key=lambda n: (next((i for i, k in enumerate(kinds)
                                                     if n.startswith(k)), 9), len(n), n))
    for name in order:
        rs = sec["runs"][name]
        lines.append(f"| {name} | {cell(stats([r['wall'] for r in rs]))} | "
                     f"{cell(stats([r.get('images_per_sec') for r in rs], 1), 0)} | "
                     f"{', '.join(str(r['load']) for r in rs)} |")
    return lines


def markdown(record):
    sections = [record["labels"][k] for k in LABELS if k in record["labels"]]
    smoke = any(s["smoke"] for s in sections)
    lines = [f"# Time to train: the demo on 2 ranks beside a plain Horovod Keras program"
             f"{' (smoke run)' if smoke else ''}", "",
             "Generated by `benchmarks/bench_time_to_train.py` (its docstring says how each "
             "number is measured). Medians over interleaved rounds (min-max); ✓/✗ against the "
             "targets of issue 14.", ""]
    lines += [describe(s) for s in sections]
    cells = [{name: (target, value) for name, target, value in headline(s)} for s in sections]
    lines += ["", f"| metric | target | {' | '.join(s['label'] for s in sections)} |",
              f"|---|---|{'---:|' * len(sections)}"]
    for name in dict.fromkeys(k for c in cells for k in c):
        target = next(c[name][0] for c in cells if name in c)
        lines.append(f"| {name} | {target} | "
                     f"{' | '.join(c[name][1] if name in c else '-' for c in cells)} |")
    for s in sections:
        lines += ["", f"## {s['label']}: runs", "", f"`{s['config']}`; SGD runs add "
                  f"`{' '.join('--set ' + x for x in s['sgd_sets'])}`; the peer under "
                  f"`{shlex.join(s['mpirun'])}`.", "", *run_table(s), "", *phase_table(s)]
        lines += [f"- {n}" for n in s["notes"]]
        knl = [r for n, rs in s["runs"].items() if n.startswith(("lars", "sgd")) for r in rs]
        if any(r["eval_mean"] is not None and not r["eval_per_epoch"] for r in knl):
            lines.append("- metrics.jsonl has no per-epoch `eval_seconds`: a boundary less its "
                         "evaluation uses the run's mean evaluation, first (traced) one included")
        if s["summary"]["startup"]["lars"]["startup_seconds"] is None:
            lines.append("- this knl-train writes no start-up account in summary.json: launch to "
                         "first step is estimated from outside only")
    return "\n".join(lines).rstrip() + "\n"


# ---- setting up and writing -----------------------------------------------------------------
class Context:
    """What every run needs: the knl-train under test, its checkout, the data, a work folder."""

    def __init__(self, args, work: Path):
        self.knl = str(Path(args.knl_train).absolute())
        self.checkout = checkout_of(Path(self.knl))
        self.config = (args.config or self.checkout / "jobs" / "train" / "demo.yaml").resolve()
        self.python = str(Path(self.knl).with_name("python"))
        self.data, self.ranks, self.work = args.data.resolve(), args.ranks, work
        self.mpirun = peer_mpirun(self.knl, args.ranks)


def checkout_of(knl: Path) -> Path:
    """The checkout a knl-train executable belongs to (its demo config and commit), else ours."""
    for d in knl.parents:
        if (d / "jobs" / "train" / "demo.yaml").exists():
            return d
    return ROOT


def commit_of(checkout: Path) -> str:
    git = lambda *a: subprocess.run(["git", "-C", str(checkout), *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    return commit + (" +local changes" if commit and git("status", "--porcelain",
                                                         "--untracked-files=no") else "")


def ensure_demo(ctx):
    if not (ctx.data / "dataset.json").exists():
        print(f"making the demo dataset in {ctx.data} ...", file=sys.stderr, flush=True)
        subprocess.run([ctx.knl, "data", "make-demo", "--out", str(ctx.data), "--classes", "40",
                        "--train-per-class", "260", "--val-per-class", "50", "--size", "32",
                        "--seed", "0", "--quiet"], check=True, cwd=ctx.checkout)


def save(out_dir: Path, stem: str, section: dict) -> dict:
    """Put this label's section into the results, keeping the other label's; write both files."""
    json_path = out_dir / f"{stem}.json"
    record = {"targets": TARGETS, "labels": {}}
    if json_path.exists():
        try:
            record["labels"] = json.loads(json_path.read_text()).get("labels", {})
        except (json.JSONDecodeError, AttributeError):
            print(f"note: {json_path} was unreadable; starting it afresh", file=sys.stderr)
    record["labels"][section["label"]] = section
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps(record, indent=1) + "\n")  # in the order written
    write_text_atomic(out_dir / f"{stem}.md", markdown(record))
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", choices=LABELS, required=True, help="which section this run fills")
    p.add_argument("--knl-train", default=str(ROOT / ".venv" / "bin" / "knl-train"),
                   help="the knl-train executable to measure (default this checkout's .venv)")
    p.add_argument("--config", type=Path, help="default: that checkout's jobs/train/demo.yaml")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo",
                   help="the demo folder dataset (made if missing)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --smoke 1)")
    p.add_argument("--marginal-epochs", type=int, nargs=2, metavar=("LO", "HI"),
                   help="the two lengths whose difference is the marginal epoch (default 3 6)")
    p.add_argument("--compare-epochs", type=int, help="epochs of the side-by-side runs (default 5)")
    p.add_argument("--no-sgd-marginal", dest="sgd_marginal", action="store_false",
                   help="run SGD only at the compared length (saves about a third of the time)")
    p.add_argument("--smoke", action="store_true",
                   help="prove the script end to end: 1 round, 1 and 2 epochs, no SGD marginal")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="default benchmarks/results")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = args.rounds or 1
        args.marginal_epochs = args.marginal_epochs or (1, 2)
        args.compare_epochs = args.compare_epochs or 2
        args.sgd_marginal = False
    args.rounds = args.rounds or 3
    args.marginal_epochs = tuple(args.marginal_epochs or (3, 6))
    args.compare_epochs = args.compare_epochs or 5
    if args.marginal_epochs[0] >= args.marginal_epochs[1]:
        p.error("--marginal-epochs LO HI needs LO < HI")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_ttt."))
    ctx = Context(args, work)
    ensure_demo(ctx)
    machine = host()
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"{args.label}: {ctx.knl} ({commit_of(ctx.checkout) or '?'}), {args.rounds} round(s); "
          f"logs in {work}", file=sys.stderr, flush=True)
    try:
        res = run_rounds(ctx, plan(args), args.rounds)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    section = {
        "label": args.label, "smoke": args.smoke, "machine": machine,
        "measured": {"knl_train": ctx.knl, "checkout": str(ctx.checkout),
                     "commit": commit_of(ctx.checkout)},
        "config": str(ctx.config), "data": str(ctx.data), "ranks": args.ranks,
        "rounds": args.rounds, "marginal_epochs": list(args.marginal_epochs),
        "compare_epochs": args.compare_epochs, "sgd_sets": SGD, "mpirun": ctx.mpirun,
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "summary": summarize(res, args), "runs": res,
        "notes": [n for n in [load_note(load_before, machine["cpus_available"])] if n],
        "total_seconds": round(time.perf_counter() - t0, 1)}
    stem = "time_to_train.smoke" if args.smoke else "time_to_train"
    record = save(args.out_dir, stem, section)
    print("\n" + markdown(record))
    print(f"wrote {args.out_dir / stem}.json and .md ({section['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
