"""The trainer's cost over a bare Keras fit loop, and its weak scaling from 1 to 2 ranks.

    .venv/bin/python benchmarks/bench_trainer.py            # full run (idle machine, ~9-11 min)
    .venv/bin/python benchmarks/bench_trainer.py --quick    # smoke run (~3 min)

Part 1 (overhead, target <= 3%): ``knl-train train`` on 1 rank (default logging every 10 steps,
agreement every 20, evaluation and a checkpoint every epoch) against a bare loop that this
script runs in a worker process (``--bare``): the same model, input pipeline, optimizer
(LARS under Horovod's DistributedOptimizer, same schedule) and thread settings, in one ``fit``
over all epochs with no callback but a timer (the trainer's ``fit`` also spans all epochs). Both
sides time an epoch from its start to the end of its last step, as the trainer's metrics do,
and leave out the first epoch (tracing). The wall time per epoch is reported beside it. Both run
under ``knl-train launch -np 1 --threads-per-rank 1``, so both are bound to the same core.
Default: small_cnn on the demo folder data (32 px), 64 per batch, 4 epochs.

Part 2 (weak scaling, target >= 90%): ``knl-train train`` on 1 rank x 1 thread and on 2 ranks
x 1 thread, each rank bound to its own core, fixed batch per rank, synthetic data with the
same number of steps per epoch; efficiency = 2-rank images/s / (2 x 1-rank images/s), from the
runs' summary.json (steady state: first epoch left out).

This machine is noisy: the configurations alternate within each round (ABBA: each round starts
with the other one), and the tables report medians over rounds with their min-max; overhead
and efficiency are also given per round, from runs next to each other. Results go to
``benchmarks/results/trainer.{json,md}`` (``trainer.quick.*`` for --quick), with the machine,
its load average and the versions the runs recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import host, load_note, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KNL = str(Path(sys.executable).with_name("knl-train"))
TARGETS = {"overhead_pct": 3.0, "efficiency": 0.90}
DEMO = dict(classes=40, train_per_class=260, val_per_class=50, size=32, seed=0)


# ---- the bare loop (worker process) --------------------------------------------------------
def bare_worker(overrides, out):
    """Train as the trainer does, minus its callbacks; write per-epoch times to ``out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from knl_train.train.config import load
    cfg = load(None, overrides)
    from knl_train.runtime import itex
    if itex.requested():
        itex.enable()
    # The trainer's own pieces (train.setup): threads, sizes, schedule, model and optimizer.
    import tensorflow as tf
    from knl_train.dist import horovod as dist
    from knl_train.train import setup
    cfg = setup.with_data_threads(cfg)
    world = dist.init()
    setup.configure_threads(cfg, world)
    setup.configure_keras(cfg)
    data, size = setup.data_and_sizes(cfg, world.size)
    schedule = setup.build_schedule(cfg, updates_per_epoch=size.updates_per_epoch,
                                    total_updates=size.total_updates,
                                    global_batch=size.global_batch, passes=size.passes)
    model, _ = setup.build_model_and_optimizer(cfg, schedule, len(data.classes))
    batch, steps = size.per_rank, size.updates_per_epoch

    class EpochTimer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.ends = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())
            self.seconds.append(self.ends[-1] - self.t0)

    # The loop a user would write: one fit over all epochs (each epoch's data as the trainer
    # orders it, chained), not the trainer's one fit per epoch.
    ds = data.train(0, 1, batch, 0, 0, steps)
    for epoch in range(1, cfg.epochs):
        ds = ds.concatenate(data.train(0, 1, batch, epoch, 0, steps))
    timer = EpochTimer()
    model.fit(ds, epochs=cfg.epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    Path(out).write_text(json.dumps({"epoch_seconds": timer.seconds, "epoch_ends": timer.ends,
                                     "images_per_epoch": batch * steps}))


# ---- running the two sides -----------------------------------------------------------------
def launch(ranks, command, log):
    """Run ``command`` under knl-train launch; returns the times at which "epoch N/M" lines
    arrived (the trainer prints one after each epoch's evaluation and checkpoint)."""
    line = [KNL, "launch", "-np", str(ranks), "--threads-per-rank", "1", "--", *command]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KNL_TRAIN_PROGRESS": "lines"}
    arrivals = []
    with open(log, "w") as f:
        proc = subprocess.Popen(line, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for text in proc.stdout:
            if re.match(r"epoch \d+/\d+ ", text):
                arrivals.append(time.perf_counter())
            f.write(text)
    if proc.wait():
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(line)}\n{tail}")
    return arrivals


def steady_rate(images_per_epoch, epoch_seconds):
    """images/s over all epochs but the first (the summary's definition)."""
    steady = epoch_seconds[1:] or epoch_seconds
    return images_per_epoch * len(steady) / sum(steady)


def mean_gap(times):
    """Mean seconds between consecutive epoch ends (epochs 2..N): the wall time of an epoch."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def run_bare(overrides, work, tag):
    out = work / f"{tag}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--bare", str(out)]
    launch(1, command + [a for o in overrides for a in ("--set", o)], work / f"{tag}.log")
    r = json.loads(out.read_text())
    return {"images_per_sec": steady_rate(r["images_per_epoch"], r["epoch_seconds"]),
            "wall_seconds_per_epoch": mean_gap(r["epoch_ends"])}


def run_trainer(ranks, overrides, work, tag):
    run_dir = work / tag
    command = [KNL, "train", "--fresh", *[a for o in overrides for a in ("--set", o)],
               "--set", f"run_dir={run_dir}"]
    arrivals = launch(ranks, command, work / f"{tag}.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"images_per_sec": summary["images_per_sec"],
            "wall_seconds_per_epoch": mean_gap(arrivals),
            "versions": summary.get("versions", {})}


# ---- summaries -----------------------------------------------------------------------------
def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "samples": [round(v, 2) for v in values]}


def rounds(configs, repeats, label):
    """Run every configuration once per round, each round starting with the next one."""
    results = {name: [] for name, _ in configs}
    for r in range(repeats):
        for name, fn in configs[r % len(configs):] + configs[:r % len(configs)]:
            res = fn(f"{label}-{name}-{r}")
            results[name].append(res)
            print(f"  {label} round {r + 1}/{repeats}: {name:8s} {res['images_per_sec']:8.1f} img/s",
                  file=sys.stderr, flush=True)
    return results


def overhead_part(args, work):
    o = args.overhead_settings
    bare = lambda tag: run_bare(o, work, tag)  # noqa: E731
    trainer = lambda tag: run_trainer(1, o, work, tag)  # noqa: E731
    res = rounds([("bare", bare), ("trainer", trainer)], args.repeats, "overhead")
    col = lambda side, key: [r[key] for r in res[side]]  # noqa: E731
    b, t = col("bare", "images_per_sec"), col("trainer", "images_per_sec")
    pct = lambda tr, ba: round(100 * (1 - tr / ba), 2)  # noqa: E731
    overhead = pct(statistics.median(t), statistics.median(b))
    return {
        "settings": o, "bare": stats(b), "trainer": stats(t),
        "wall_seconds_per_epoch": {"bare": stats(col("bare", "wall_seconds_per_epoch")),
                                   "trainer": stats(col("trainer", "wall_seconds_per_epoch"))},
        "overhead_pct": overhead, "overhead_pct_by_round": [pct(x, y) for x, y in zip(t, b)],
        "target_pct": TARGETS["overhead_pct"],
        "meets_target": overhead <= TARGETS["overhead_pct"],
    }, res["trainer"][0]["versions"]


def scaling_part(args, work):
    def trainer(ranks):
        o = args.scaling_settings + [f"data.num_examples={args.batch * args.scaling_steps * ranks}"]
        return lambda tag: run_trainer(ranks, o, work, tag)
    res = rounds([("1 rank", trainer(1)), ("2 ranks", trainer(2))], args.repeats, "scaling")
    one = [r["images_per_sec"] for r in res["1 rank"]]
    two = [r["images_per_sec"] for r in res["2 ranks"]]
    eff = round(statistics.median(two) / (2 * statistics.median(one)), 3)
    return {
        "settings": args.scaling_settings, "steps_per_epoch": args.scaling_steps,
        "ranks": {"1": stats(one), "2": stats(two)}, "efficiency": eff,
        "efficiency_by_round": [round(y / (2 * x), 3) for x, y in zip(one, two)],
        "target": TARGETS["efficiency"], "meets_target": eff >= TARGETS["efficiency"],
    }


# ---- settings, machine, output -------------------------------------------------------------
def settings(args):
    common = [f"model={args.model}", f"per_rank_batch={args.batch}", "data.image_size=32",
              "data.threads=1", "threads.intra_op=1", "threads.inter_op=1"]
    args.overhead_settings = common + ["data.format=folder", f"data.path={args.data}",
                                       f"epochs={args.epochs}"]
    args.scaling_settings = common + ["data.format=synthetic", "data.num_classes=40",
                                      f"epochs={args.scaling_epochs}"]


def ensure_demo(path):
    if (path / "dataset.json").exists():
        return json.loads((path / "dataset.json").read_text())
    print(f"making the demo dataset in {path} ...", file=sys.stderr, flush=True)
    subprocess.run([KNL, "data", "make-demo", "--out", str(path), "--quiet",
                    *[a for k, v in DEMO.items() for a in (f"--{k.replace('_', '-')}", str(v))]],
                   check=True, cwd=ROOT)
    return json.loads((path / "dataset.json").read_text())


def fmt(s, digits=1):
    return "-" if s is None else f"{s['median']:.{digits}f}"


def spread(s, digits=1):
    return "-" if s is None else f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"


def markdown(rec):
    m, v, a, b = rec["machine"], rec["versions"], rec["overhead"], rec["scaling"]
    ok = lambda x: "✓" if x else "✗"  # noqa: E731
    lines = [f"# Trainer overhead and weak scaling{' (quick smoke run)' if rec['quick'] else ''}",
             "",
             f"{m['cpu']}, {m['cpus_available']} CPUs available ({m['threads_per_core']} thread(s) "
             f"per core), TF {v.get('tensorflow', '?')}, Horovod {v.get('horovod', '?')}, "
             f"{v.get('mpi', '?')}; load average {rec['load_before']} before, "
             f"{rec['load_after']} after; {m['date']}, commit {m['git_commit'] or '?'}.", "",
             f"Medians over {rec['repeats']} interleaved rounds (min-max); first epoch of every "
             "run left out.", "",
             "## Overhead over a bare Keras fit loop (1 rank, 1 core)", "",
             f"`{' '.join(a['settings'])}`", "",
             "| loop | images/s | min-max | wall s/epoch (incl. eval + checkpoint) |",
             "|---|---:|---:|---:|"]
    wall = a["wall_seconds_per_epoch"]
    lines += [f"| bare Keras fit | {fmt(a['bare'])} | {spread(a['bare'])} | {fmt(wall['bare'], 2)} |",
              f"| knl-train train | {fmt(a['trainer'])} | {spread(a['trainer'])} | "
              f"{fmt(wall['trainer'], 2)} |", "",
              "images/s: an epoch's training steps, from its start to its last step. Wall s/epoch: "
              "from one epoch's end to the next, epochs 2..N (the trainer's includes its "
              "evaluation and checkpoint, the bare loop's neither).", "",
              f"Overhead {a['overhead_pct']:.2f}% (per round: "
              f"{', '.join(f'{x:.2f}%' for x in a['overhead_pct_by_round'])}); target ≤ "
              f"{a['target_pct']:g}% {ok(a['meets_target'])}.", "",
              "## Weak scaling, 1 thread per rank, each rank on its own core", "",
              f"`{' '.join(b['settings'])}`, {b['steps_per_epoch']} steps per epoch", "",
              "| ranks | images/s | min-max | per rank |", "|---:|---:|---:|---:|"]
    for n, s in b["ranks"].items():
        lines.append(f"| {n} | {fmt(s)} | {spread(s)} | {s['median'] / int(n):.1f} |")
    lines += ["", f"Efficiency {b['efficiency']:.3f} (per round: "
              f"{', '.join(f'{x:.3f}' for x in b['efficiency_by_round'])}); target ≥ "
              f"{b['target']:g} {ok(b['meets_target'])}.", ""]
    lines += [f"- {n}" for n in rec["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (fewer epochs and steps)")
    p.add_argument("--repeats", type=int, help="interleaved rounds per part (default 3, quick 2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="default benchmarks/results")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo",
                   help="demo folder dataset for part 1 (made if missing)")
    p.add_argument("--bare", metavar="OUT_JSON", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare:
        return bare_worker(args.set, args.bare)

    args.repeats = args.repeats or (2 if args.quick else 3)
    args.epochs = 2 if args.quick else 4
    args.scaling_epochs = 2 if args.quick else 3
    args.scaling_steps = 15 if args.quick else 100
    t0 = time.perf_counter()
    machine = host()
    args.data = args.data.resolve()
    demo = ensure_demo(args.data)
    settings(args)
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"{machine['cpu']} ({machine['cpus_available']} CPUs), {args.repeats} rounds per part",
          file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="bench_trainer."))
    try:
        overhead, versions = overhead_part(args, work)
        scaling = scaling_part(args, work)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)

    notes = [n for n in [load_note(load_before, machine["cpus_available"])] if n]
    record = {"quick": args.quick, "machine": machine, "versions": versions, "demo_data": demo,
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "repeats": args.repeats, "targets": TARGETS, "overhead": overhead,
              "scaling": scaling, "notes": notes,
              "total_seconds": round(time.perf_counter() - t0, 1)}
    stem = "trainer.quick" if args.quick else "trainer"
    json_path, md_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    write_results(json_path, md_path, record, markdown(record))
    print("\n" + markdown(record))
    print(f"wrote {json_path} and {md_path} ({record['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
