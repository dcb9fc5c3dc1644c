"""The autotuner on this machine: ResNet-50 with TF's defaults against the best setting it finds.

    .venv/bin/python benchmarks/bench_tuning.py                   # full run (idle machine, ~30 min)
    .venv/bin/python benchmarks/bench_tuning.py --image-size 224  # the issue's size (~3x longer)
    .venv/bin/python benchmarks/bench_tuning.py --quick           # smoke run (~5 min)

Runs ``knl-train tune`` (the same code, called in-process) on ResNet-50 at 128 px, batch 16 per
node, 3 warm-up + 10 timed steps per trial, 3 interleaved repeats per comparison, with its default
greedy search over every dimension plus precision (``--precision fp32,mixed_bf16``: the tuner
has to find bf16 by itself). The target (issue 6): the best setting the tuner finds is at least
1.9x TF's defaults (one rank, no preset, no settings) in images/s, medians against medians. The
best fp32 setting is reported beside it, since bf16 changes numerics.

Results go to ``benchmarks/results/tuning.{json,md,png}`` and the tuned preset to
``tuning.preset.yaml`` (``tuning.quick.*`` for --quick), with the machine and its load average.
The quick run is a smoke test of the whole path, at 64 px with fewer steps and repeats and no
oneDNN-off or blocktime stage; its numbers mean little.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import host, load_note, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.9


def tune_argv(args, out):
    argv = ["--model", args.model, "--image-size", str(args.image_size), "--batch", str(args.batch),
            "--precision", "fp32,mixed_bf16"]
    if args.quick:
        argv += ["--warmup", "2", "--steps", "4", "--repeats", str(args.repeats or 2),
                 "--onednn", "on", "--blocktime", "1"]
    else:
        argv += ["--warmup", "3", "--steps", "10", "--repeats", str(args.repeats or 3)]
    return argv + ["--out", str(out)]


def versions():
    out = {}
    for name, dist in (("tensorflow", "tensorflow"), ("horovod", "horovod")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    from knl_train.runtime import versions
    from knl_train.runtime import itex
    out["itex"] = itex.side_version() or itex.site_version()
    out["mpi"] = versions.mpi_library_version()
    return out


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rec):
    m, t, v = rec["machine"], rec["tuner"], rec["versions"]
    base, best, fp32 = rec["tf_defaults"], rec["best"], rec["best_fp32"]
    ok = "✓" if rec["meets_target"] else "✗"
    ok16 = "✓" if rec["meets_target_with_bf16"] else "✗"
    w = t["workload"]
    lines = [f"# Autotuner: {w['model']} at {w['image_size']} px"
             f"{' (quick smoke run)' if rec['quick'] else ''}", "",
             f"{m['cpu']}, {m['cpus_available']} CPUs available ({m['threads_per_core']} thread(s) "
             f"per core), TF {v['tensorflow']}, Horovod {v['horovod']}, ITEX {v['itex'] or 'none'}, "
             f"{v['mpi']}; load average {rec['load_before']} before, {rec['load_after']} after; "
             f"{m['date']}, commit {m['git_commit'] or '?'}; {rec['total_seconds'] / 60:.0f} min, "
             f"{len(t['trials'])} trials.", "",
             f"`knl-train tune {' '.join(rec['tune_argv'])}`", "",
             f"- TF defaults: {fmt(base['median'], 2)} images/s (min-max {fmt(base['min'])}-"
             f"{fmt(base['max'])})",
             f"- best in fp32 (the issue's search space): {fp32['label'] if fp32 else '-'}, "
             f"{fmt(fp32['median'] if fp32 else None, 2)} images/s: "
             f"**{fmt(rec['speedup_fp32'], 2)}x**; target ≥ {rec['target']:g}x {ok}",
             f"- best with bf16 allowed: **{best['label']}**, {fmt(best['median'], 2)} images/s "
             f"(min-max {fmt(best['min'])}-{fmt(best['max'])}): **{fmt(rec['speedup'], 2)}x** "
             f"{ok16}"]
    lines += ["", "## The tuner's report", ""]
    # The tuner's own Markdown, a level down.
    body = t["markdown"].split("\n", 1)[1].lstrip("\n")
    lines += [("#" + line) if line.startswith("## ") else line for line in body.splitlines()]
    lines += ["", f"Chart: `{rec['files']['chart']}`; preset: `{rec['files']['preset']}`."]
    if rec["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rec["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, fewer steps and stages")
    p.add_argument("--image-size", type=int, help="image side (default 128, quick 64)")
    p.add_argument("--batch", type=int, default=16, help="images per node per step (default 16)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--repeats", type=int, help="per comparison (default 3, quick 2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="default benchmarks/results")
    args = p.parse_args(argv)
    args.image_size = args.image_size or (64 if args.quick else 128)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from knl_train import autotune
    from knl_train.autotune.results import OutputFiles
    from knl_train.cli import tune as tune_cli
    t0 = time.perf_counter()
    machine = host()
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="bench_tuning."))
    targv = tune_argv(args, work)
    parser = argparse.ArgumentParser(prog="knl-train tune")
    tune_cli.add_arguments(parser)
    try:
        result = autotune.run(tune_cli.options_from_args(parser.parse_args(targv)))
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise

    stem = "tuning.quick" if args.quick else "tuning"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    chart, preset_file = args.out_dir / f"{stem}.png", args.out_dir / f"{stem}.preset.yaml"
    shutil.copyfile(work / "tuning.png", chart)
    shutil.copyfile(result.files.preset, preset_file)
    shutil.rmtree(work, ignore_errors=True)
    result = dataclasses.replace(result, files=OutputFiles(
        preset=Path(_shown(preset_file)), results=Path(_shown(json_path)),
        table=Path(_shown(md_path)), chart=Path(_shown(chart))))
    tuner = result.to_dict()
    tuner["markdown"] = autotune.markdown(result)

    rows = tuner["candidates"]
    best = next(r for r in rows if r["id"] == tuner["best"]["id"])
    base = next((r for r in rows if r["baseline"] and "median" in r), None)
    fp32 = next((r for r in rows if r["precision"] == "fp32" and "median" in r), None)
    # The tuner's own notes (bf16, the preset's other settings) are in its report.
    notes = [n for n in [load_note(load_before, machine["cpus_available"])] if n]
    speedup = tuner["speedup"]
    # The search space has no precision: the target is judged on the best fp32 setting.
    speedup_fp32 = (fp32["median"] / base["median"]) if fp32 and base else None
    record = {"quick": args.quick, "machine": machine, "versions": versions(),
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "tune_argv": targv[:-2],  # less --out (a temporary directory)
              "target": TARGET, "speedup": speedup, "speedup_fp32": speedup_fp32,
              "meets_target": speedup_fp32 is not None and speedup_fp32 >= TARGET,
              "meets_target_with_bf16": speedup is not None and speedup >= TARGET,
              "tf_defaults": base, "best": best, "best_fp32": fp32,
              "files": tuner["files"],
              "notes": notes, "tuner": tuner, "total_seconds": round(time.perf_counter() - t0, 1)}
    write_results(json_path, md_path, record, markdown(record))
    print("\n" + markdown(record))
    print(f"wrote {json_path}, {md_path}, {chart} and {preset_file} "
          f"({record['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
