"""A convergence study's numbers from hand-made runs: collect (summary, curve, job output, a
metrics line cut short), the table's best LR, the verdict. The fixtures serve the report's and
the charts' tests too."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies import accuracy as acc
from knl_train.studies import accuracy_report as ar
from knl_train.studies import report as rep
from knl_train.studies.manifest import JobRecord, Manifest, PointRecord
from tests.unit.studies.test_report import make_study

IMAGES = 8192          # per epoch: updates per epoch = 8192 / global batch
EPOCHS = 4
RANKS, MICRO = 2, 64
PNG = b"\x89PNG\r\n\x1a\n"

# (optimizer, batch, lr) -> validation top-1 per epoch (the last is the final), or a status.
# lars holds 72.0 % from 256 to 4096 (71.5, 71.1: within a point); sgd-goyal loses 2 points
# at 1024 and 19 at 4096.
CURVES = {
    ("lars", 256, 2.0): [0.40, 0.55, 0.62, 0.70],
    ("lars", 256, 4.0): [0.42, 0.58, 0.66, 0.72],
    ("lars", 1024, 2.0): [0.35, 0.50, 0.61, 0.715],
    ("lars", 1024, 4.0): [0.30, 0.52, 0.64, 0.713],
    ("lars", 4096, 2.0): [0.30, 0.48, 0.60, 0.711],
    ("lars", 4096, 4.0): "nan-in-metrics",
    ("sgd-goyal", 256, 0.1): [0.45, 0.60, 0.68, 0.74],
    ("sgd-goyal", 256, 0.2): [0.44, 0.59, 0.69, 0.74],     # a tie: the smaller LR wins
    ("sgd-goyal", 1024, 0.1): [0.40, 0.55, 0.65, 0.70],
    ("sgd-goyal", 1024, 0.2): [0.41, 0.56, 0.66, 0.72],
    ("sgd-goyal", 4096, 0.1): [0.30, 0.57, 0.50, 0.55],    # best 57 % at epoch 2; target never
    ("sgd-goyal", 4096, 0.2): "pending",
}


def pid(label: str, batch: int, lr: float, repeat: int = 0) -> str:
    return f"{label}-b{batch:06d}-lr{lr:g}-r{repeat}"


def wall(epoch: int) -> float:
    return 100.0 * epoch + 10.0       # start-up 10 s, then 100 s per epoch


def write_run(run_dir: Path, batch: int, curve, *, top1="last", extra=None, lines=()):
    """summary.json and metrics.jsonl: a step record and an epoch record per epoch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    per_epoch = IMAGES // batch
    recs = []
    for e, v in enumerate(curve, 1):
        recs.append({"kind": "step", "step": e * per_epoch, "epoch": e, "loss": 2.0 / e,
                     "images_per_sec": 500.0})
        recs.append({"kind": "epoch", "epoch": e, "step": e * per_epoch, "loss": 2.0 / e,
                     "val_top1": v, "val_top5": min(1.0, v + 0.2), "epoch_seconds": 90.0,
                     "wall_seconds": wall(e)})
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs) + "".join(l + "\n" for l in lines))
    final = curve[-1] if curve else None
    summary = {"top1": final if top1 == "last" else top1,
               "top5": None if final is None else min(1.0, final + 0.2), "train_loss": 0.5,
               "world_size": RANKS, "global_batch": batch, "steps": EPOCHS * per_epoch,
               "wall_seconds": wall(EPOCHS) + 5.0, "optimizer": "lars", "resumed_from_step": None,
               **(extra or {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def point(label, batch, lr, repeat=0, state="completed", job_id="12") -> PointRecord:
    p = pid(label, batch, lr, repeat)
    return PointRecord(id=p, nodes=1, ranks_per_node=RANKS, ranks=RANKS, global_batch=batch,
                       per_rank_batch=MICRO, epochs=EPOCHS, run_dirs=(f"points/{p}/run-0",),
                       job=JobRecord(id=job_id, state=state, recorded=("id", "state")),
                       optimizer=label, lr=lr, repeat=repeat, accumulation=batch // (RANKS * MICRO))


def save_manifest(root: Path, points, *, target=0.6, repeats=1, epochs=EPOCHS) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Manifest.new(study="lb-test", scheduler="local", scaling=None, kind="convergence",
                 repeats=repeats, warmup_steps=0, images_per_epoch=IMAGES, project_epochs=epochs,
                 target_top1=target, reference_batch=256, epochs=epochs,
                 points=tuple(points)).save(root)


def study(tmp_path, target=0.6) -> Path:
    root = tmp_path / "study"
    points = []
    for (label, batch, lr), curve in CURVES.items():
        run = root / "points" / pid(label, batch, lr) / "run-0"
        if curve == "pending":
            points.append(point(label, batch, lr, state="pending", job_id="13"))
            continue
        points.append(point(label, batch, lr, state="failed" if isinstance(curve, str) else
                            "completed"))
        if curve == "nan-in-metrics":     # the guard stopped it: no summary, a NaN loss logged
            write_run(run, batch, [0.2])
            (run / "summary.json").unlink()
            with open(run / "metrics.jsonl", "a") as f:
                f.write('{"kind": "step", "step": 7, "loss": NaN, "images_per_sec": 500.0}\n')
        else:
            write_run(run, batch, curve)
    save_manifest(root, points, target=target)
    return root


def by_id(results):
    return {p["id"]: p for p in results["points"]}


def rows_by_key(rows):
    return {(r["optimizer"], r["global_batch"]): r for r in rows}


# ---- collect ---------------------------------------------------------------------------------

def test_collect_reads_final_best_curve_and_target(tmp_path):
    root = study(tmp_path)
    results = acc.collect(root)
    assert json.loads((root / "results.json").read_text()) == results
    assert (results["kind"], results["study"], results["target_top1"], results["epochs"],
            results["reference_batch"]) == ("convergence", "lb-test", 0.6, EPOCHS, 256)
    p = by_id(results)[pid("lars", 256, 4.0)]
    assert (p["status"], p["reason"], p["top1"], p["best_top1"]) == ("ok", None, 0.72, 0.72)
    assert p["top5"] == pytest.approx(0.92) and p["best_top5"] == pytest.approx(0.92)
    assert (p["optimizer"], p["global_batch"], p["lr"], p["repeat"], p["accumulation"]) == \
        ("lars", 256, 4.0, 0, 2)
    assert (p["updates"], p["wall_seconds"]) == (128, 415.0)
    assert p["curve"] == [[1, 0.42, 0.62, 110.0], [2, 0.58, 0.78, 210.0],
                          [3, 0.66, pytest.approx(0.86), 310.0], [4, 0.72, pytest.approx(0.92),
                                                                  410.0]]
    # First epoch at or above 0.60 is epoch 3 (0.66); its wall clock is 310 s.
    assert (p["epochs_to_target"], p["seconds_to_target"], p["target_reached"]) == (3, 310.0,
                                                                                    True)
    # Exactly at the target counts: 0.60 at epoch 2.
    sgd = by_id(results)[pid("sgd-goyal", 256, 0.1)]
    assert (sgd["epochs_to_target"], sgd["seconds_to_target"]) == (2, 210.0)


def test_not_reached_and_best_differs_from_final(tmp_path):
    p = by_id(acc.collect(study(tmp_path)))[pid("sgd-goyal", 4096, 0.1)]
    assert (p["status"], p["top1"], p["best_top1"]) == ("ok", 0.55, 0.57)
    assert (p["epochs_to_target"], p["seconds_to_target"], p["target_reached"]) == (None, None,
                                                                                    False)
    assert p["updates"] == 8


def test_no_target_means_no_time_to_target(tmp_path):
    results = acc.collect(study(tmp_path, target=None))
    p = by_id(results)[pid("lars", 256, 4.0)]
    assert (p["epochs_to_target"], p["target_reached"]) == (None, None)
    row = rows_by_key(acc.table(results))[("lars", 256)]
    md = ar.markdown(results, acc.table(results))
    assert "No target_top1 was set" in md and "| no target | no target |" in md
    assert row["best_lr"] == 4.0


def test_diverged_missing_and_failed_runs(tmp_path):
    root = study(tmp_path)
    points = by_id(acc.collect(root))
    nan = points[pid("lars", 4096, 4.0)]
    assert (nan["status"], nan["reason"]) == (
        "diverged", "the loss is not finite at step 7; no summary.json; job 12 failed")
    assert nan["top1"] is None and nan["curve"] == [[1, 0.2, pytest.approx(0.4), 110.0]]
    pending = points[pid("sgd-goyal", 4096, 0.2)]
    assert (pending["status"], pending["reason"]) == ("missing", "no summary.json; job 13 pending")


def test_divergence_from_summary_and_job_output_and_plain_failure(tmp_path):
    root = tmp_path / "s"
    pts = [point("lars", 256, lr, state="failed") for lr in (1.0, 2.0, 3.0, 4.0)]
    runs = [root / p.run_dirs[0] for p in pts]
    # 1: summary written, no evaluation, the training loss not finite.
    write_run(runs[0], 256, [], top1=None, extra={"train_loss": float("nan")})
    # 2: no summary; the job's output holds the divergence guard's error.
    write_run(runs[1], 256, [0.3])
    (runs[1] / "summary.json").unlink()
    (runs[1].parent / "slurm-12.out").write_text(
        "knl-train: error: the loss is not finite (nan or inf) at step 9 (epoch 1)\n")
    # 3: no summary, nothing says why: failed. 4: summary without top-1, finite loss.
    runs[2].mkdir(parents=True)
    write_run(runs[3], 256, [], top1=None)
    save_manifest(root, pts)
    got = [(p["status"], p["reason"]) for p in acc.collect(root)["points"]]
    assert got == [
        ("diverged", f"{pts[0].run_dirs[0]}: the loss is not finite"),
        ("diverged", f"the loss is not finite; no summary.json; job 12 failed; points/{pts[1].id}"
                     '/slurm-12.out says "the loss is not finite (nan or inf) at step 9 '
                     '(epoch 1)"'),
        ("failed", f"no summary.json; job 12 failed; no job output in points/{pts[2].id}"),
        ("problem", f"{pts[3].run_dirs[0]}/summary.json has no top-1: the run did not evaluate")]


def test_damaged_and_mismatched_runs_are_problems_naming_the_file(tmp_path):
    root = tmp_path / "s"
    pts = [point("lars", 256, lr) for lr in (1.0, 2.0, 3.0, 4.0)]
    runs = [root / p.run_dirs[0] for p in pts]
    for r in runs:
        write_run(r, 256, [0.5, 0.6])
    (runs[0] / "summary.json").write_text('{"top1": 0.')
    (runs[1] / "summary.json").write_text(
        json.dumps({**json.loads((runs[1] / "summary.json").read_text()), "world_size": 4}))
    with open(runs[2] / "metrics.jsonl", "a") as f:
        f.write('{"kind": "epoch", "epoch": 3, "val_top1"\n')
    (runs[3] / "summary.json").write_text(json.dumps({"top1": 0.6, "global_batch": 256}))
    save_manifest(root, pts)
    reasons = [p["reason"] for p in acc.collect(root)["points"]]
    assert reasons[0].startswith(f"{pts[0].run_dirs[0]}/summary.json is damaged: ")
    assert reasons[1] == f"{pts[1].run_dirs[0]}/summary.json: world_size 4 != point 2"
    assert reasons[2] == f"{pts[2].run_dirs[0]}/metrics.jsonl line 5 is not JSON"
    assert reasons[3] == f"{pts[3].run_dirs[0]}/summary.json: missing or invalid world_size"


def test_resumed_run_adds_each_process_clock_and_keeps_the_later_epoch(tmp_path):
    root = tmp_path / "s"
    p = point("lars", 256, 2.0)
    run = root / p.run_dirs[0]
    write_run(run, 256, [0.5, 0.55], extra={"resumed_from_step": 64})
    # The first process ran epochs 1-2 (walls 110, 210), then crashed; the second redid epoch
    # 2 (wall 60 on its own clock) and ran 3 and 4.
    epochs = [(2, 0.56, 60.0), (3, 0.61, 160.0), (4, 0.65, 260.0)]
    with open(run / "metrics.jsonl", "a") as f:
        for e, v, w in epochs:
            f.write(json.dumps({"kind": "epoch", "epoch": e, "step": 32 * e, "val_top1": v,
                                "wall_seconds": w}) + "\n")
    save_manifest(root, [p])
    r = acc.collect(root)["points"][0]
    assert [c[0] for c in r["curve"]] == [1, 2, 3, 4]
    assert [c[1] for c in r["curve"]] == [0.5, 0.56, 0.61, 0.65]
    assert [c[3] for c in r["curve"]] == [110.0, 270.0, 370.0, 470.0]
    assert (r["resumed"], r["epochs_to_target"], r["seconds_to_target"]) == (True, 3, 370.0)
    assert "Resumed runs (lars-b000256-lr2-r0)" in ar.markdown(
        acc.collect(root), acc.table(acc.collect(root)))


def test_a_restart_after_one_epoch_is_seen_though_the_clock_did_not_go_back(tmp_path):
    """The first process ran one epoch (wall 110 s) and died; the resumed one ends epoch 2 at
    110 s of its own clock: not after the last record by the epoch's 90 s of training, so a
    new process (time to target 220 s, not 110 s)."""
    root = tmp_path / "s"
    p = point("lars", 256, 2.0)
    run = root / p.run_dirs[0]
    write_run(run, 256, [0.5], extra={"resumed_from_step": 32})
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "epoch", "epoch": 2, "step": 64, "val_top1": 0.65,
                            "epoch_seconds": 90.0, "wall_seconds": 110.0}) + "\n")
    save_manifest(root, [p])
    r = acc.collect(root)["points"][0]
    assert [c[3] for c in r["curve"]] == [110.0, 220.0]
    assert (r["resumed"], r["epochs_to_target"], r["seconds_to_target"]) == (True, 2, 220.0)


def test_a_failed_point_names_its_newest_job_output_and_quotes_its_last_error(tmp_path):
    root = tmp_path / "s"
    pts = [point("lars", 256, 1.0, state="failed", job_id="7"),
           point("lars", 256, 2.0, state="failed", job_id="8"),
           dataclasses.replace(point("lars", 256, 4.0), job=JobRecord(
               id=None, state="submit-failed", error="sbatch: error: invalid partition",
               recorded=("id", "state", "error")))]
    dirs = [root / "points" / p.id for p in pts]
    for d in dirs:
        d.mkdir(parents=True)
    # The point ran before (job 6); job 7's output is the newer one, and its last error counts.
    (dirs[0] / "slurm-6.out").write_text("knl-train: error: an older failure\n")
    (dirs[0] / "local-7.out").write_text(
        "knl-train: error: not this one\nknl-train: error: dataset path /data/nope does not "
        "exist: set data.path\nmpirun detected that one or more processes exited\n")
    os.utime(dirs[0] / "slurm-6.out", (1_000_000, 1_000_000))
    os.utime(dirs[0] / "local-7.out", (2_000_000, 2_000_000))
    # PBS's output (-j oe), without a knl-train error: the scheduler killed the job.
    (dirs[1] / "lb-test-p1.o8").write_text("=>> PBS: job killed: walltime 60 exceeded limit 60\n")
    save_manifest(root, pts)
    got = [(p["status"], p["reason"], p["output"]) for p in acc.collect(root)["points"]]
    assert got == [
        ("failed", f'no summary.json; job 7 failed; points/{pts[0].id}/local-7.out says "dataset '
                   'path /data/nope does not exist: set data.path"',
         f"points/{pts[0].id}/local-7.out"),
        ("failed", f"no summary.json; job 8 failed; see points/{pts[1].id}/lb-test-p1.o8",
         f"points/{pts[1].id}/lb-test-p1.o8"),
        ("failed", "no summary.json; job submit-failed: sbatch: error: invalid partition", None)]


def test_a_last_metrics_line_cut_short_is_left_out_and_noted(tmp_path):
    """A process killed while writing leaves a last line without its newline; the run's
    summary.json still counts. A complete last record without its newline is kept as it is."""
    root = tmp_path / "s"
    pts = [point("lars", 256, 1.0), point("lars", 256, 2.0, state="failed"),
           point("lars", 256, 4.0)]
    runs = [root / p.run_dirs[0] for p in pts]
    for r, curve in zip(runs, ([0.5, 0.62], [0.5], [0.5, 0.62])):
        write_run(r, 256, curve)
    for r in runs[:2]:
        with open(r / "metrics.jsonl", "a") as f:
            f.write('{"kind": "step", "step": 70, "lo')
    (runs[1] / "summary.json").unlink()
    text = (runs[2] / "metrics.jsonl").read_text()
    (runs[2] / "metrics.jsonl").write_text(text.rstrip("\n"))
    save_manifest(root, pts)
    ok, failed, whole = acc.collect(root)["points"]
    cut = "metrics.jsonl line {} was cut short (an interrupted write) and is left out"
    assert (ok["status"], ok["top1"], ok["epochs_to_target"], len(ok["curve"])) == \
        ("ok", 0.62, 2, 2)
    assert ok["reason"] == f"{pts[0].run_dirs[0]}/{cut.format(5)}"
    assert (failed["status"], failed["reason"]) == (
        "failed", f"no summary.json; job 12 failed; no job output in points/{pts[1].id}; "
                  f"{pts[1].run_dirs[0]}/{cut.format(3)}")
    assert failed["curve"] == [[1, 0.5, pytest.approx(0.7), 110.0]]
    assert (whole["status"], whole["reason"], len(whole["curve"])) == ("ok", None, 2)
    md = ar.markdown(acc.collect(root), acc.table(acc.collect(root)))
    assert f"## Notes\n\n- {pts[0].id}: {pts[0].run_dirs[0]}/{cut.format(5)}\n" in md


def test_a_bad_metrics_line_in_the_middle_is_still_a_problem(tmp_path):
    """A write cut short and then a resumed process appending: the fragment and the next record
    share a line in the middle of the file."""
    root = tmp_path / "s"
    p = point("lars", 256, 1.0)
    run = root / p.run_dirs[0]
    write_run(run, 256, [0.5, 0.62])
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"kind": "epoch", "ep' + lines[1]
    (run / "metrics.jsonl").write_text("".join(lines))
    save_manifest(root, [p])
    r = acc.collect(root)["points"][0]
    assert (r["status"], r["reason"]) == ("problem", f"{p.run_dirs[0]}/metrics.jsonl line 2 is "
                                                     "not JSON")


# ---- table -----------------------------------------------------------------------------------

def test_table_best_lr_and_every_lr_tried(tmp_path):
    rows = acc.table(acc.collect(study(tmp_path)))
    assert [(r["optimizer"], r["global_batch"]) for r in rows] == [
        ("lars", 256), ("lars", 1024), ("lars", 4096),
        ("sgd-goyal", 256), ("sgd-goyal", 1024), ("sgd-goyal", 4096)]
    assert [r["best_lr"] for r in rows] == [4.0, 2.0, 2.0, 0.1, 0.2, 0.1]
    assert [r["top1"] for r in rows] == [0.72, 0.715, 0.711, 0.74, 0.72, 0.55]
    assert [r["best_top1"] for r in rows] == [0.72, 0.715, 0.711, 0.74, 0.72, 0.57]
    assert [r["epochs_to_target"] for r in rows] == [3, 3, 3, 2, 3, None]
    assert [r["seconds_to_target"] for r in rows] == [310.0, 310.0, 310.0, 210.0, 310.0, None]
    assert [r["updates"] for r in rows] == [128, 32, 8, 128, 32, 8]
    assert [r["accumulation"] for r in rows] == [2, 8, 32, 2, 8, 32]
    t = rows_by_key(rows)
    assert t[("lars", 4096)]["lrs"] == ["2: 71.1 %", "4: diverged"]
    assert t[("sgd-goyal", 256)]["lrs"] == ["0.1: 74.0 %", "0.2: 74.0 %"]
    assert t[("sgd-goyal", 4096)]["lrs"] == ["0.1: 55.0 %", "0.2: missing"]
    assert (t[("sgd-goyal", 4096)]["reached"], t[("sgd-goyal", 4096)]["repeats"]) == (0, 1)


def test_repeats_mean_min_max_and_a_batch_without_data(tmp_path):
    root = tmp_path / "s"
    pts = []
    # lr 1: 0.70 and 0.74 (mean 0.72); lr 2: 0.73 and 0.71 (mean 0.72, a tie: lr 1 wins);
    # lr 3: 0.60 and a diverged run (the mean of the one usable run).
    for lr, finals in ((1.0, [0.70, 0.74]), (2.0, [0.73, 0.71]), (3.0, [0.60, None])):
        for r, v in enumerate(finals):
            pts.append(point("lamb", 256, lr, repeat=r))
            if v is None:
                write_run(root / pts[-1].run_dirs[0], 256, [], top1=None,
                          extra={"train_loss": float("nan")})
            else:
                write_run(root / pts[-1].run_dirs[0], 256, [0.5, v])
    pts.append(point("lamb", 512, 1.0, state="failed"))
    save_manifest(root, pts, repeats=2)
    rows = acc.table(acc.collect(root))
    first = rows[0]
    assert first["best_lr"] == 1.0 and first["repeats"] == 2
    assert first["top1"] == pytest.approx(0.72)
    assert (first["top1_min"], first["top1_max"]) == (0.70, 0.74)
    assert first["lrs"] == ["1: 72.0 %", "2: 72.0 %", "3: 60.0 % (1 of 2 runs)"]
    assert rows[1]["best_lr"] is None and rows[1]["lrs"] == ["1: failed"]
    md = ar.markdown(acc.collect(root), rows)
    assert "| 256 | 2 | 1 | 72.0 % (70.0-74.0) |" in md
    assert "| 512 | 4 | — | — | — | — | — | — | — | — | 1: failed |" in md
    assert "- lamb: within 1 point only up to 256; at 512 no accuracy vs 72.0 % at 256" in md


def _lr_grid(root: Path, grid) -> None:
    """grid: (batch, lr) -> each repeat's final top-1, or "diverged" / "failed"."""
    pts = []
    for (batch, lr), finals in grid.items():
        for r, v in enumerate(finals):
            pts.append(point("lars", batch, lr, repeat=r, state="failed" if v == "failed"
                             else "completed"))
            run = root / pts[-1].run_dirs[0]
            if v == "diverged":
                write_run(run, batch, [0.3], top1=None, extra={"train_loss": float("nan")})
            elif v == "failed":
                run.mkdir(parents=True)
            else:
                write_run(run, batch, [0.4, v])
    save_manifest(root, pts, repeats=3)


def test_best_lr_prefers_lrs_whose_every_repeat_is_usable(tmp_path):
    """At 256, LR 2 has the best run (80 %) but two of its three diverged: LR 1, usable in all
    three (70 %), is the best. At 512 no LR is usable in every repeat (a failed one counts as
    much as a diverged one): the larger share of usable repeats wins (2 of 3 at 56 % over 1 of
    3 at 60 %), and the table says so."""
    root = tmp_path / "s"
    _lr_grid(root, {(256, 1.0): [0.69, 0.70, 0.71], (256, 2.0): [0.80, "diverged", "diverged"],
                    (512, 1.0): [0.60, "diverged", "failed"], (512, 2.0): [0.55, 0.57, "failed"]})
    results = acc.collect(root)
    rows = acc.table(results)
    assert [(r["best_lr"], r["repeats"], r["best_lr_runs"]) for r in rows] == [(1.0, 3, 3),
                                                                              (2.0, 2, 3)]
    assert [r["top1"] for r in rows] == [pytest.approx(0.70), pytest.approx(0.56)]
    assert rows[0]["lrs"] == ["1: 70.0 %", "2: 80.0 % (1 of 3 runs)"]
    assert rows[1]["lrs"] == ["1: 60.0 % (1 of 3 runs)", "2: 56.0 % (2 of 3 runs)"]
    md = ar.markdown(results, rows)
    assert "| 256 | 2 | 1 | 70.0 % (69.0-71.0) |" in md
    assert "| 512 | 4 | 2 (2 of 3 runs) | 56.0 % (55.0-57.0) |" in md
    assert "- lars: within 1 point only up to 256; at 512 56.0 % (-14.0 points) vs 70.0 % at " \
           "256" in md
    assert "is best only when no LR has all its repeats usable" in md


# ---- verdict ---------------------------------------------------------------------------------

def test_verdict_wording():
    assert acc.verdict([("lars", 256, 0.766), ("lars", 1024, 0.765), ("lars", 8192, 0.761)]) \
        == ["lars: holds its accuracy up to global batch 8192 (76.1 % vs 76.6 % at 256)"]
    assert acc.verdict([("sgd", 256, 0.766), ("sgd", 1024, 0.760), ("sgd", 4096, 0.70),
                        ("sgd", 8192, 0.61)]) == [
        "sgd: within 1 point only up to 1024 (at 4096: 70.0 %, -6.6 points); at 8192 61.0 % "
        "(-15.6 points) vs 76.6 % at 256"]
    assert acc.verdict([("sgd", 256, 0.766), ("sgd", 8192, 0.61)]) == [
        "sgd: within 1 point only up to 256; at 8192 61.0 % (-15.6 points) vs 76.6 % at 256"]
    assert acc.verdict([("a", 256, None), ("a", 512, float("nan"))]) == [
        "a: no accuracy measured"]
    assert acc.verdict([]) == []


def test_verdict_edges():
    # Exactly one point below holds; several values at one batch are averaged.
    assert acc.verdict([("x", 128, 0.50), ("x", 256, 0.49), ("x", 256, 0.49)]) == [
        "x: holds its accuracy up to global batch 256 (49.0 % vs 50.0 % at 128)"]
    assert acc.verdict([("x", 256, 0.5), ("x", 256, 0.6)]) == [
        "x: only global batch 256 measured (55.0 %)"]
    assert acc.verdict([("x", 128, None), ("x", 256, 0.5), ("x", 512, 0.5)]) == [
        "x: holds its accuracy up to global batch 512 (50.0 % vs 50.0 % at 256) "
        "(no accuracy at 128)"]
    two = acc.verdict([("b", 64, 0.3), ("a", 64, 0.2), ("b", 128, 0.1)])
    assert two == ["b: within 1 point only up to 64; at 128 10.0 % (-20.0 points) vs 30.0 % "
                   "at 64", "a: only global batch 64 measured (20.0 %)"]


def test_missing_manifest_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError) as e:
        acc.collect(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "manifest.json") in str(e.value)


# ---- the scaling report's verdict ------------------------------------------------------------

def test_scaling_report_has_an_accuracy_verdict(tmp_path):
    root = make_study(tmp_path / "w", "weak", [(1, 64, "completed", [400, 400]),
                                                (2, 128, "completed", [720, 720])])
    md = rep.report(root)["md"].read_text()
    assert ("## Accuracy\n\nNo accuracy measured: the runs did not evaluate (their summary.json "
            "has no top1).\n") in md
    for rel, top1 in (("n0001/run-0", 0.70), ("n0001/run-1", 0.72), ("n0002/run-0", 0.69),
                      ("n0002/run-1", 0.69)):
        path = root / "points" / rel / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "top1": top1,
                                    "optimizer": "lars"}))
    md = rep.report(root)["md"].read_text()
    assert "## Accuracy\n\n- lars: within 1 point only up to 64; at 128 69.0 % (-2.0 points) " \
           "vs 71.0 % at 64\n" in md
    assert not math.isnan(rep.collect(root)["points"][0]["repeats"][0]["top1"])
