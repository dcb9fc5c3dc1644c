"""A miniature of the seed papers' claim: LARS keeps its accuracy at a large batch where momentum
SGD with Goyal et al.'s recipe loses it.

    .venv/bin/python benchmarks/bench_large_batch.py            # the study, ~60 min on 2 cores
    .venv/bin/python benchmarks/bench_large_batch.py --smoke    # 4 short points: the flow only

It generates the dataset the study trains on (``knl-train data make-demo``, into
``data/large-batch-mini``, once), then runs ``jobs/studies/large-batch-mini.yaml`` through the
README's commands on this node's ``local`` site: ``knl-train study render``, ``submit``,
``status --wait`` and ``report``. The study directory is ``runs/large-batch-mini/<time>``.
The table, the verdict against the issue's target (at the largest batch, LARS within 2 points of
top-1 of the base batch's best, SGD with Goyal's recipe at least 5 points below it) and the
study's own report go to ``benchmarks/results/large_batch.{json,md,png}`` (``--smoke``:
``large_batch.smoke.*``), with the CPU and the load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from machine import host, load_note

from knl_train.atomic import write_json_atomic, write_text_atomic
from knl_train.studies import accuracy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPEC = ROOT / "jobs" / "studies" / "large-batch-mini.yaml"
KT = str(Path(sys.executable).with_name("knl-train"))
# The generated dataset (data/demo.py): why these sizes is in the study's YAML.
DATASET = {"classes": 40, "train_per_class": 160, "val_per_class": 50, "size": 16, "seed": 7}
DATA = ROOT / "data" / "large-batch-mini"
# The target, in points of top-1.
LARS_WITHIN, SGD_BELOW = 2.0, 5.0


def run(*argv, timeout=None) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, argv)), flush=True)
    proc = subprocess.run([str(a) for a in argv], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout)
    if proc.returncode:
        sys.exit(f"failed (rc {proc.returncode}): {' '.join(map(str, argv))}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_dataset() -> None:
    stamp = DATA / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == DATASET:
        return
    shutil.rmtree(DATA, ignore_errors=True)
    run(KT, "data", "make-demo", "--out", DATA, *(f"--{k.replace('_', '-')}={v}" for k, v in DATASET.items()))
    write_json_atomic(stamp, DATASET)


def smoke_spec(out: Path) -> Path:
    """The study cut to 2 batches, 1 LR each, 1 epoch: the whole flow in a few minutes."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["name"] += "-smoke"
    spec["global_batches"] = spec["global_batches"][:1] + spec["global_batches"][-1:]
    spec["epochs"] = 1
    for trial in spec["optimizers"].values():
        trial["lr"] = trial["lr"][:1]
    spec["train"]["config"] = str((SPEC.parent / spec["train"]["config"]).resolve())
    path = out / "large-batch-mini-smoke.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def verdict(rows) -> dict:
    """The issue's target, judged on the report's best-LR rows."""
    batches = sorted({r["global_batch"] for r in rows})
    base, top = batches[0], batches[-1]
    best = {(r["optimizer"], r["global_batch"]): r["top1"] for r in rows if r["top1"] is not None}
    reference = max((v for (o, b), v in best.items() if b == base), default=None)
    out = {"base_batch": base, "largest_batch": top, "base_top1": reference}
    for label in sorted({r["optimizer"] for r in rows}):
        at_top = best.get((label, top))
        out[label] = {"top1_at_largest": at_top, "points_below_base":
                      None if at_top is None or reference is None else 100 * (reference - at_top)}
    lars = [k for k in out if isinstance(out[k], dict) and k.startswith("lars")]
    sgd = [k for k in out if isinstance(out[k], dict) and k.startswith("sgd")]
    gap = lambda k: out[k]["points_below_base"]  # noqa: E731
    out["lars_within_2"] = bool(lars) and all(gap(k) is not None and gap(k) <= LARS_WITHIN for k in lars)
    out["sgd_5_below"] = bool(sgd) and all(gap(k) is not None and gap(k) >= SGD_BELOW for k in sgd)
    out["target_met"] = out["lars_within_2"] and out["sgd_5_below"]
    return out


def markdown(record: dict, report_md: str) -> str:
    v, m = record["verdict"], record["machine"]
    lines = [f"# Large-batch miniature: {'target met' if v['target_met'] else 'target not met'}", "",
             f"`{record['command']}` on {m['cpu']} ({m['cpus_available']} CPUs available), "
             f"{m['date']}, commit {m['git_commit']}; the study took {record['study_seconds'] / 60:.1f} min. "
             f"1-min load before: {record['load_before'][0]:.2f}.", "",
             f"Target: at the largest batch ({v['largest_batch']}), LARS within {LARS_WITHIN:g} points of the "
             f"base batch's best top-1 ({_pct(v['base_top1'])} at {v['base_batch']}), SGD with Goyal's recipe "
             f"at least {SGD_BELOW:g} points below it.", ""]
    for label in (k for k in v if isinstance(v[k], dict)):
        g = v[label]["points_below_base"]
        lines.append(f"- {label}: {_pct(v[label]['top1_at_largest'])} at {v['largest_batch']}"
                     + ("" if g is None else f", {g:.1f} points below the base" if g >= 0 else
                        f", {-g:.1f} points above the base"))
    lines += [*(f"- note: {n}" for n in record["notes"]), "", "## The study's report", "",
              report_md.split("\n", 1)[1] if report_md.startswith("# ") else report_md]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 batches, 1 LR, 1 epoch: checks the flow")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="give up waiting after this many seconds")
    args = ap.parse_args()
    machine, load_before = host(), os.getloadavg()
    make_dataset()
    out = ROOT / "runs" / "large-batch-mini" / dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = smoke_spec(out.parent) if args.smoke else SPEC
    start = time.monotonic()
    run(KT, "study", "render", spec, "--out", out)
    run(KT, "study", "submit", out)
    status = subprocess.run([KT, "study", "status", out, "--wait", "--timeout", str(args.timeout)], cwd=ROOT)
    seconds = time.monotonic() - start
    report_md = run(KT, "study", "report", out).stdout.split("\nwrote ")[0]
    results = json.loads((out / "results.json").read_text())
    rows = accuracy.table(results)
    suffix = ".smoke" if args.smoke else ""
    record = {"command": "benchmarks/bench_large_batch.py" + (" --smoke" if args.smoke else ""),
              "machine": machine, "load_before": list(load_before), "study_dir": str(out),
              "study_seconds": seconds, "status_rc": status.returncode, "dataset": DATASET,
              "spec": yaml.safe_load(Path(spec).read_text()), "rows": rows, "verdict": verdict(rows),
              "notes": [n for n in [load_note(load_before, machine["cpus_available"])] if n]}
    write_json_atomic(RESULTS / f"large_batch{suffix}.json", record)
    write_text_atomic(RESULTS / f"large_batch{suffix}.md", markdown(record, report_md))
    chart = out / "report" / "convergence.png"
    if chart.is_file():  # not drawn when no run is usable
        shutil.copyfile(chart, RESULTS / f"large_batch{suffix}.png")
    print(markdown(record, report_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
