"""Convergence-study report: collect, table, verdict, CSV/Markdown/PNGs from hand-made runs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies import accuracy as acc
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


def save_manifest(root: Path, points, *, target=0.6, repeats=1) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Manifest.new(study="lb-test", scheduler="local", scaling=None, kind="convergence",
                 repeats=repeats, warmup_steps=0, images_per_epoch=IMAGES, project_epochs=EPOCHS,
                 target_top1=target, reference_batch=256, epochs=EPOCHS,
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
    md = acc.markdown(results, acc.table(results))
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
        ("diverged", "the loss is not finite; no summary.json; job 12 failed"),
        ("failed", "no summary.json; job 12 failed"),
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
    assert "Resumed runs (lars-b000256-lr2-r0)" in acc.markdown(
        acc.collect(root), acc.table(acc.collect(root)))


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
    md = acc.markdown(acc.collect(root), rows)
    assert "| 256 | 2 | 1 | 72.0 % (70.0-74.0) |" in md
    assert "| 512 | 4 | — | — | — | — | — | — | — | — | 1: failed |" in md
    assert "- lamb: within 1 point only up to 256; at 512 no accuracy vs 72.0 % at 256" in md


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


# ---- outputs ---------------------------------------------------------------------------------

def test_csv_matches_each_runs_summary(tmp_path):
    root = study(tmp_path)
    paths = acc.report(root)
    assert paths["csv"] == root / "report" / "convergence.csv"
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(acc.COLUMNS)
        back = list(reader)
    assert [r["id"] for r in back] == sorted(pid(*k) for k in CURVES)
    manifest = Manifest.load(root)
    for row in back:
        p = manifest.point(row["id"])
        assert (row["optimizer"], int(row["global_batch"]), float(row["lr"]),
                int(row["accumulation"])) == (p.optimizer, p.global_batch, p.lr, p.accumulation)
        summary_path = root / p.run_dirs[0] / "summary.json"
        if row["status"] != "ok":
            assert row["top1"] == "" and row["reason"] and not summary_path.exists()
            continue
        summary = json.loads(summary_path.read_text())
        assert float(row["top1"]) == summary["top1"] and float(row["top5"]) == summary["top5"]
        assert int(row["updates"]) == summary["steps"]
        assert float(row["wall_seconds"]) == summary["wall_seconds"]
        curve = CURVES[(p.optimizer, p.global_batch, p.lr)]
        assert float(row["best_top1"]) == max(curve) and int(row["epochs_evaluated"]) == 4
    statuses = {r["id"]: r["status"] for r in back}
    assert statuses[pid("lars", 4096, 4.0)] == "diverged"
    assert statuses[pid("sgd-goyal", 4096, 0.2)] == "missing"


def test_markdown(tmp_path):
    md = acc.report(study(tmp_path))["md"].read_text()
    assert md.startswith("# Convergence study lb-test\n")
    assert "Target: validation top-1 ≥ 60.0 %" in md and "one run of 4 epochs" in md
    verdict = md.split("## Verdict\n\n")[1].split("\n\n")
    assert verdict[0] == ("Per optimizer, the largest global batch up to which every batch's "
                          "final top-1 (best LR) stays within 1 point of its smallest batch's.")
    assert verdict[1] == (
        "- lars: holds its accuracy up to global batch 4096 (71.1 % vs 72.0 % at 256)\n"
        "- sgd-goyal: within 1 point only up to 256 (at 1024: 72.0 %, -2.0 points); at 4096 "
        "55.0 % (-19.0 points) vs 74.0 % at 256")
    assert "## lars\n" in md and "## sgd-goyal\n" in md
    assert "| 256 | 2 | 4 | 72.0 % | 92.0 % | 72.0 % | 92.0 % | 3 | 0:05:10 | 128 | " \
           "2: 70.0 %, 4: 72.0 % |" in md
    assert "| 4096 | 32 | 0.1 | 55.0 % | 75.0 % | 57.0 % | 77.0 % | not reached | not reached " \
           "| 8 | 0.1: 55.0 %, 0.2: missing |" in md
    gone = md.split("## Diverged, failed and missing runs\n\n")[1]
    assert gone.startswith(
        "- lars-b004096-lr4-r0: diverged: the loss is not finite at step 7; no summary.json; "
        "job 12 failed\n- sgd-goyal-b004096-lr0.2-r0: missing: no summary.json; job 13 pending\n")


def test_pngs_are_written(tmp_path):
    root = study(tmp_path)
    paths = acc.report(root)
    assert set(paths) == {"results", "csv", "md", "png", "curves"}
    for key, name in (("png", "convergence.png"), ("curves", "convergence-curves.png")):
        assert paths[key] == root / "report" / name
        data = paths[key].read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
    assert not list((root / "report").glob(".*"))     # no temporary file left behind


def test_report_out_dir_and_dispatch_from_the_scaling_report(tmp_path):
    root = study(tmp_path)
    paths = rep.report(root, out=tmp_path / "elsewhere")
    assert paths["md"] == tmp_path / "elsewhere" / "convergence.md"
    assert rep.collect(root)["kind"] == "convergence"


def test_without_matplotlib_skips_the_pngs(tmp_path, monkeypatch):
    root = study(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib is not available"):
        paths = acc.report(root)
    assert set(paths) == {"results", "csv", "md"}
    assert not (root / "report" / "convergence.png").exists()


# ---- errors ----------------------------------------------------------------------------------

def test_missing_manifest_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError) as e:
        acc.collect(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "manifest.json") in str(e.value)


def test_damaged_manifest_is_a_user_error_naming_it(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest.json is damaged"):
        acc.report(tmp_path)


def test_no_usable_run_is_a_user_error_naming_results(tmp_path):
    root = tmp_path / "s"
    pts = [point("lars", 256, 1.0, state="failed"), point("lars", 256, 2.0, state="running")]
    write_run(root / pts[0].run_dirs[0], 256, [0.1], top1=None,
              extra={"train_loss": float("nan")})
    save_manifest(root, pts)
    with pytest.raises(UserError) as e:
        acc.report(root)
    assert str(e.value) == (f"no point of study lb-test has a usable summary.json yet (1 run(s) "
                            f"diverged): the reasons are in {root / 'results.json'}; run "
                            f"`knl-train study status {root}` to see the jobs")
    assert json.loads((root / "results.json").read_text())["points"][1]["reason"] == \
        "no summary.json; job 12 running"


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
