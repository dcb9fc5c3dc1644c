"""Scaling-study report: collect, table, CSV/Markdown/PNG from hand-made run directories."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies import report as rep

IMAGES = 1_281_167
SLOW = 5.0          # the warm-up step's rate: far below every real rate


def step_rates(r: float):
    """Nine steady per-step rates with median r, asymmetric to a slow first step.

    With the slow step counted, the median of the ten would be r - 0.5.
    """
    return [r - 4, r + 4, r - 3, r + 3, r, r - 2, r + 2, r - 1, r + 1]


def write_run(run_dir: Path, *, ranks: int, batch: int, rates=None, summary_ips=None,
              warmup_rates=(SLOW,), extra: dict | None = None):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    step = 0
    for ips in list(warmup_rates) + list(rates or []):
        step += 1
        lines.append({"kind": "step", "step": step, "images_per_sec": ips,
                      "step_seconds": batch / ips, "loss": 6.9})
        if step == 1:
            lines.append({"kind": "trust", "step": 1, "layer": "conv1", "ratio": 0.01})
    lines.append({"kind": "epoch", "epoch": 1, "step": step, "images_per_sec": 1.0,
                  "epoch_seconds": 99.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"images_per_sec": summary_ips if summary_ips is not None else 1.0,
               "world_size": ranks, "global_batch": batch, "steps": step, **(extra or {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def make_study(root: Path, scaling: str, points, *, warmup=1, epochs=90, repeats=2):
    """points: (nodes, global_batch, job_state, [per-repeat median rate or None])."""
    manifest_points = []
    for i, (nodes, gb, state, rates) in enumerate(points, 1):
        pid = f"n{i:04d}"
        ranks = 2 * nodes
        run_dirs = [f"points/{pid}/run-{r}" for r in range(len(rates))]
        manifest_points.append({
            "id": pid, "nodes": nodes, "ranks_per_node": 2, "ranks": ranks,
            "global_batch": gb, "per_rank_batch": gb // ranks, "steps": 10,
            "run_dirs": run_dirs, "job": {"id": str(100 + i), "state": state}})
        for rel, r in zip(run_dirs, rates):
            if r is not None:
                write_run(root / rel, ranks=ranks, batch=gb, rates=step_rates(r),
                          warmup_rates=[SLOW] * warmup)
    manifest = {"version": 1, "study": f"{scaling}-resnet", "scheduler": "slurm",
                "scaling": scaling, "images_per_epoch": IMAGES, "project_epochs": epochs,
                "warmup_steps": warmup, "repeats": repeats, "points": manifest_points}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def weak_study(tmp_path):
    # Per-node rate 400 at 1 node; efficiencies 1.0, 0.9, 0.8, 0.7 at 1, 2, 4, 8 nodes.
    # Repeats X-10 and X+10: the median of two is X.
    return make_study(tmp_path / "weak", "weak", [
        (1, 64, "completed", [390, 410]),
        (2, 128, "completed", [710, 730]),
        (4, 256, "completed", [1270, 1290]),
        (8, 512, "completed", [2230, 2250]),
    ])


def strong_study(tmp_path):
    # 1 node never ran; baseline is 2 nodes at 300 images/s; efficiencies 1.0, 0.9, 0.8.
    return make_study(tmp_path / "strong", "strong", [
        (2, 256, "completed", [300, 300]),
        (1, 256, "failed", [None, None]),
        (4, 256, "completed", [530, 540, 550]),
        (8, 256, "completed", [960, 960]),
    ], warmup=2, repeats=3)


# ---- collect and table -------------------------------------------------------------------

def test_weak_table_values(tmp_path):
    rows = rep.table(rep.collect(weak_study(tmp_path)))
    assert list(rows[0]) == ["nodes", "ranks", "global_batch", "images_per_sec",
                             "images_per_sec_min", "images_per_sec_max", "repeats", "speedup",
                             "efficiency", "epoch_seconds", "eval_seconds_per_epoch",
                             "checkpoint_seconds_per_epoch", "startup_seconds",
                             "time_90_epochs_hours", "warmup_included"]
    assert [r["warmup_included"] for r in rows] == [False] * 4
    assert [r["nodes"] for r in rows] == [1, 2, 4, 8]
    assert [r["ranks"] for r in rows] == [2, 4, 8, 16]
    assert [r["global_batch"] for r in rows] == [64, 128, 256, 512]
    assert [r["images_per_sec"] for r in rows] == pytest.approx([400, 720, 1280, 2240])
    assert [r["images_per_sec_min"] for r in rows] == pytest.approx([390, 710, 1270, 2230])
    assert [r["images_per_sec_max"] for r in rows] == pytest.approx([410, 730, 1290, 2250])
    assert [r["repeats"] for r in rows] == [2, 2, 2, 2]
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.8, 3.2, 5.6])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert rows[0]["epoch_seconds"] == pytest.approx(3202.9175)          # 1281167 / 400
    assert rows[0]["time_90_epochs_hours"] == pytest.approx(80.0729375)  # 90 epochs / 3600
    assert rows[1]["epoch_seconds"] == pytest.approx(IMAGES / 720)
    assert rows[3]["time_90_epochs_hours"] == pytest.approx(90 * IMAGES / 2240 / 3600)
    # These summaries have no time account: its costs are unknown, not zero.
    assert all(r[k] is None for r in rows for k in ("eval_seconds_per_epoch",
                                                     "checkpoint_seconds_per_epoch",
                                                     "startup_seconds"))


def test_warmup_steps_excluded_from_each_repeat(tmp_path):
    results = rep.collect(weak_study(tmp_path))
    first = results["points"][0]
    assert [r["images_per_sec"] for r in first["repeats"]] == [390.0, 410.0]  # not 389.5
    assert all(r["source"] == "metrics" and r["steps_used"] == 9 for r in first["repeats"])
    assert first["values"] == [390.0, 410.0]
    assert (first["n"], first["images_per_sec"]) == (2, 400.0)
    # Two warm-up steps in the strong study: both slow steps are left out.
    strong = rep.collect(strong_study(tmp_path))
    assert strong["points"][2]["values"] == [530.0, 540.0, 550.0]


def test_strong_scaling_baseline_is_smallest_node_count_with_data(tmp_path):
    results = rep.collect(strong_study(tmp_path))
    rows = rep.table(results)
    assert [r["nodes"] for r in rows] == [2, 4, 8]
    assert [r["images_per_sec"] for r in rows] == pytest.approx([300, 540, 960])
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.8, 3.2])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.8])
    assert [r["repeats"] for r in rows] == [2, 3, 2]
    assert rows[1]["images_per_sec_min"] == 530 and rows[1]["images_per_sec_max"] == 550
    gone = rep.missing(results)
    assert gone == [{"id": "n0002", "nodes": 1, "ranks": 2, "reasons": [
        "points/n0002/run-0: no summary.json; job 102 failed",
        "points/n0002/run-1: no summary.json; job 102 failed"]}]


def test_missing_repeat_reported_with_job_state(tmp_path):
    root = make_study(tmp_path / "s", "weak", [
        (1, 64, "completed", [400, 400]),
        (2, 128, "timeout", [720, None]),
    ])
    results = rep.collect(root)
    point = results["points"][1]
    assert point["n"] == 1 and point["images_per_sec"] == 720.0
    assert point["repeats"][1] == {"run_dir": "points/n0002/run-1", "status": "missing",
                                   "reason": "no summary.json; job 102 timeout"}
    # Unknown state: job without state, and no job at all.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["points"][1]["job"] = {"id": "7", "state": None}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert (rep.collect(root)["points"][1]["repeats"][1]["reason"]
            == "no summary.json; job 7 state unknown")
    del manifest["points"][1]["job"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert (rep.collect(root)["points"][1]["repeats"][1]["reason"]
            == "no summary.json; no job recorded in the manifest")
    md = rep.report(root)["md"].read_text()
    assert ("- point n0002 (2 node(s)), repeat points/n0002/run-1 missing: no summary.json; "
            "no job recorded in the manifest") in md


def test_fallback_to_summary_without_steps_after_warmup(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400, 400])])
    # Repeat 1 logged only the warm-up step: its whole-run rate is all there is.
    write_run(root / "points/n0001/run-1", ranks=2, batch=64, rates=[], summary_ips=380.5)
    results = rep.collect(root)
    r0, r1 = results["points"][0]["repeats"]
    assert (r0["source"], r0["images_per_sec"]) == ("metrics", 400.0)
    assert r1 == {"run_dir": "points/n0001/run-1", "status": "ok", "images_per_sec": 380.5,
                  "source": "summary", "steps_used": 0,
                  "costs_unknown": "summary.json has no time account (an older knl-train)"}
    # The warm-up-inclusive repeat stays out of the point's median: 400, not (400 + 380.5) / 2.
    point = results["points"][0]
    assert (point["images_per_sec"], point["values"], point["n"]) == (400.0, [400.0], 1)
    assert (point["warmup_included"], point["left_out"]) == (False, ["points/n0001/run-1"])
    # No metrics.jsonl at all: the same fallback.
    (root / "points/n0001/run-1/metrics.jsonl").unlink()
    assert rep.collect(root)["points"][0]["repeats"][1]["source"] == "summary"
    md = rep.report(root)["md"].read_text()
    assert ("Left out of the median over repeats (no step records after the 1 warm-up step(s), "
            "so summary.json's whole-run images/s, which includes the warm-up):\n\n"
            "- 1 node(s): points/n0001/run-1 (380.5 images/s)\n") in md
    assert "| 1 | 2 | 64 | 400.0 | 400.0-400.0 | 1 | 1.00 |" in md


def test_world_size_mismatch_excluded_as_problem(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [390, 410]),
                                                (2, 128, "completed", [720, 720])])
    write_run(root / "points/n0001/run-1", ranks=4, batch=64, rates=step_rates(9999))
    write_run(root / "points/n0002/run-0", ranks=4, batch=100, rates=step_rates(9999))
    results = rep.collect(root)
    p1, p2 = results["points"]
    assert p1["values"] == [390.0] and p1["n"] == 1 and p1["images_per_sec"] == 390.0
    assert p1["repeats"][1] == {"run_dir": "points/n0001/run-1", "status": "problem",
                                "reason": "points/n0001/run-1/summary.json: world_size 4 != "
                                          "point 2"}
    assert p2["repeats"][0]["reason"] == ("points/n0002/run-0/summary.json: global_batch 100 "
                                          "!= point 128")
    assert rep.table(results)[1]["efficiency"] == pytest.approx((720 / 2) / 390)


def test_damaged_files_are_problems_naming_the_file(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400, 400, 400, 400])],
                      repeats=4)
    (root / "points/n0001/run-0/summary.json").write_text('{"images_per_sec": 4')
    with open(root / "points/n0001/run-1/metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 11, "images_per')
    with open(root / "points/n0001/run-2/metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 12, "images_per_sec": "fast"}\n')
    summary = json.loads((root / "points/n0001/run-3/summary.json").read_text())
    del summary["world_size"]
    (root / "points/n0001/run-3/summary.json").write_text(json.dumps(summary))
    reasons = [r.get("reason") for r in rep.collect(root)["points"][0]["repeats"]]
    assert reasons[0].startswith("points/n0001/run-0/summary.json is damaged: ")
    assert reasons[1] == "points/n0001/run-1/metrics.jsonl line 13 is not JSON"
    assert reasons[2] == ("points/n0001/run-2/metrics.jsonl line 13: a step record needs an "
                          "integer 'step' and a positive 'images_per_sec'")
    assert reasons[3] == "points/n0001/run-3/summary.json: missing or invalid world_size"
    with pytest.raises(UserError, match=r"no point of study weak-resnet has a summary.json "
                                        r"yet \(4 repeat\(s\) have a summary.json that could "
                                        r"not be used"):
        rep.report(root)


def test_only_step_records_are_checked(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400])], repeats=1)
    # Lines the report does not use may be of another shape (an older or newer writer's).
    with open(root / "points/n0001/run-0/metrics.jsonl", "a") as f:
        f.write('{"kind": "epoch", "epoch": 2}\n{"kind": "trust_ratio"}\n')
    repeat = rep.collect(root)["points"][0]["repeats"][0]
    assert (repeat["status"], repeat["images_per_sec"], repeat["steps_used"]) == ("ok", 400.0, 9)


def test_resumed_run_warms_up_again(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400])], repeats=1)
    # Steps 2-5 before the checkpoint at 5, a slow restart step 6, then steps 7-11.
    write_run(root / "points/n0001/run-0", ranks=2, batch=64,
              rates=[400, 400, 400, 400, SLOW, 410, 410, 410, 410, 410],
              extra={"resumed_from_step": 5})
    point = rep.collect(root)["points"][0]
    assert point["repeats"][0]["steps_used"] == 9
    # 400 x4 and 410 x5: median 410; with the restart step counted it would be 405.
    assert point["images_per_sec"] == 410.0


# ---- files -------------------------------------------------------------------------------

def test_results_json_is_valid_and_matches(tmp_path):
    root = weak_study(tmp_path)
    results = rep.collect(root)
    on_disk = json.loads((root / "results.json").read_text())
    assert on_disk == results
    assert on_disk["scaling"] == "weak" and on_disk["images_per_epoch"] == IMAGES
    assert [p["images_per_sec"] for p in on_disk["points"]] == [400.0, 720.0, 1280.0, 2240.0]
    assert not list(root.glob(".results.json.*"))      # no temporary file left behind


def test_report_csv_round_trips_the_table(tmp_path):
    root = weak_study(tmp_path)
    paths = rep.report(root)
    assert paths["csv"] == root / "report" / "scaling.csv"
    rows = rep.table(rep.collect(root))
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == rep.columns(rep.collect(root))
        back = list(reader)
    assert len(back) == len(rows) == 4
    for got, want in zip(back, rows):
        for k, v in want.items():
            if v is None:      # an unknown cost: an empty cell
                assert got[k] == "", k
                continue
            if isinstance(v, bool):
                assert got[k] == "false" and v is False, k
                continue
            assert (int(got[k]) if isinstance(v, int) else float(got[k])) == v, k


def test_report_markdown(tmp_path):
    root = weak_study(tmp_path)
    md = rep.report(root)["md"].read_text()
    assert md.startswith("# Scaling study weak-resnet: weak scaling\n")
    assert "Baseline: 1 node(s), 2 ranks, 400.0 images/s" in md
    assert "median of per-step images/s after 1 warm-up step(s)" in md
    assert "over 2 repeat(s)" in md
    # 1 node: 400 images/s, epoch 3202.9 s = 0:53:23, 90 epochs = 80.07 h; no time account:
    # its costs n/a, and the projection from the step time alone, marked.
    assert ("| 1 | 2 | 64 | 400.0 | 390.0-410.0 | 2 | 1.00 | 100.0 % | 0:53:23 | n/a | n/a "
            "| n/a | 80.07 \u2020 |") in md
    # 2 nodes: 1281167/720 = 1779.4 s = 0:29:39; 44.485 h.
    assert ("| 2 | 4 | 128 | 720.0 | 710.0-730.0 | 2 | 1.80 | 90.0 % | 0:29:39 | n/a | n/a "
            "| n/a | 44.48 \u2020 |") in md
    assert ("| 8 | 16 | 512 | 2240.0 | 2230.0-2250.0 | 2 | 5.60 | 70.0 % | 0:09:32 | n/a | n/a "
            "| n/a | 14.30 \u2020 |") in md
    below = md.split("## Below 75 % efficiency")[1].split("##")[0]
    assert "csc-user-guide PR #684" in below
    assert "- 8 node(s): 70.0 %" in below
    assert "- 4 node(s)" not in below and "- 2 node(s)" not in below
    assert "None: every repeat has a usable summary.json." in md


def test_report_markdown_strong_with_missing_point(tmp_path):
    root = strong_study(tmp_path)
    md = rep.report(root)["md"].read_text()
    assert md.startswith("# Scaling study strong-resnet: strong scaling\n")
    assert "Baseline: 2 node(s), 4 ranks, 300.0 images/s" in md
    assert "after 2 warm-up step(s)" in md and "over 3 repeat(s)" in md
    assert "| 4 | 8 | 256 | 540.0 | 530.0-550.0 | 3 | 1.80 | 90.0 % |" in md
    assert "None: every point reaches 75 %." in md
    assert ("- point n0002 (1 node(s)), no data:\n"
            "  - points/n0002/run-0: no summary.json; job 102 failed\n"
            "  - points/n0002/run-1: no summary.json; job 102 failed") in md


def test_report_png(tmp_path):
    root = weak_study(tmp_path)
    png = rep.report(root)["png"]
    assert png == root / "report" / "scaling.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    assert not list(png.parent.glob(".scaling.png.*"))


def test_report_out_dir_and_projection_column(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400, 400])], epochs=30)
    paths = rep.report(root, out=tmp_path / "elsewhere")
    assert set(paths) == {"results", "csv", "md", "png"}
    assert all(p.parent == tmp_path / "elsewhere" for k, p in paths.items() if k != "results")
    header = paths["csv"].read_text().splitlines()[0]
    assert header.endswith(",epoch_seconds,eval_seconds_per_epoch,checkpoint_seconds_per_epoch,"
                           "startup_seconds,time_30_epochs_hours,warmup_included")
    assert rep.table(rep.collect(root))[0]["time_30_epochs_hours"] == pytest.approx(
        30 * IMAGES / 400 / 3600)
    assert "| 30 epochs (h) |" in paths["md"].read_text()


def test_report_without_matplotlib_skips_png(tmp_path, monkeypatch):
    root = weak_study(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import raises ImportError
    with pytest.warns(UserWarning, match="matplotlib is not available"):
        paths = rep.report(root)
    assert "png" not in paths and not (root / "report" / "scaling.png").exists()
    assert paths["csv"].is_file() and paths["md"].is_file()


# ---- the projected time to train -------------------------------------------------------

def add_account(run_dir: Path, *, startup: float, eval_s: float, evals: int, ckpt_s: float,
                ckpts: int, every=(1, 1), epochs_trained: float = 0.0005):
    """A newer knl-train's run: summary.json's time account, and config.yaml's cadence."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary.update({"startup_seconds": startup, "train_seconds": 20.0, "eval_seconds": eval_s,
                    "checkpoint_seconds": ckpt_s, "other_seconds": 1.0,
                    "startup": {"import": startup}, "images_trained": 640,
                    "epochs_trained": epochs_trained, "evaluations": evals,
                    "checkpoints": ckpts, "wall_images_per_sec": 20.0,
                    "time_to_train_efficiency": 0.8})
    path.write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text(
        f"model: resnet50_v1_5\neval:\n  every_epochs: {every[0]}\n"
        f"checkpoint:\n  every_epochs: {every[1]}\n  keep: 1\n")


def test_projection_adds_start_up_and_per_epoch_eval_and_checkpoint(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400, 400]),
                                                (2, 128, "completed", [720, 720])])
    before = rep.table(rep.collect(root))
    # Point 1: evaluation and checkpoint every epoch. Repeat medians: start-up (10+14)/2 = 12,
    # evaluation (1.5+2.5)/2 = 2.0 s each, checkpoint (0.25+0.75)/2 = 0.5 s each.
    add_account(root / "points/n0001/run-0", startup=10.0, eval_s=4.5, evals=3, ckpt_s=0.75,
                ckpts=3)
    add_account(root / "points/n0001/run-1", startup=14.0, eval_s=5.0, evals=2, ckpt_s=1.5,
                ckpts=2)
    # Point 2: one evaluation (4 s) and one checkpoint (9 s) every 1000 epochs: a 90-epoch run
    # has one of each, at its end. Divided by its 0.0005 epochs trained it would be 8,000 s
    # per epoch.
    for r in range(2):
        add_account(root / f"points/n0002/run-{r}", startup=30.0, eval_s=4.0, evals=1,
                    ckpt_s=9.0, ckpts=1, every=(1000, 1000))
    results = rep.collect(root)
    first = results["points"][0]
    assert [r["eval_seconds_each"] for r in first["repeats"]] == [1.5, 2.5]
    assert [r["checkpoint_seconds_per_epoch"] for r in first["repeats"]] == [0.25, 0.75]
    rows = rep.table(results)
    assert (rows[0]["startup_seconds"], rows[0]["eval_seconds_per_epoch"],
            rows[0]["checkpoint_seconds_per_epoch"]) == (12.0, 2.0, 0.5)
    assert rows[1]["startup_seconds"] == 30.0
    assert rows[1]["eval_seconds_per_epoch"] == pytest.approx(4.0 / 90)
    assert rows[1]["checkpoint_seconds_per_epoch"] == pytest.approx(9.0 / 90)
    # Exactly start-up + E x (eval + checkpoint per epoch) more than the step time alone.
    proj = "time_90_epochs_hours"
    assert rows[0][proj] - before[0][proj] == pytest.approx((12.0 + 90 * (2.0 + 0.5)) / 3600,
                                                            rel=1e-12)
    assert rows[1][proj] - before[1][proj] == pytest.approx((30.0 + 4.0 + 9.0) / 3600,
                                                            rel=1e-12)
    assert rows[0][proj] == pytest.approx(80.0729375 + 237 / 3600, rel=1e-12)
    # Throughput, epoch time and efficiency do not change.
    for got, was in zip(rows, before):
        assert {k: got[k] for k in ("images_per_sec", "epoch_seconds", "efficiency")} == \
            {k: was[k] for k in ("images_per_sec", "epoch_seconds", "efficiency")}


def test_point_without_time_account_projects_from_steps_and_is_footnoted(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [400, 400]),
                                                (2, 128, "completed", [720, 720])])
    for r in range(2):
        add_account(root / f"points/n0001/run-{r}", startup=12.0, eval_s=2.0, evals=1,
                    ckpt_s=0.5, ckpts=1)
    # Point 2 mixes an accounted repeat with an older knl-train's: not projected from the mix.
    add_account(root / "points/n0002/run-0", startup=12.0, eval_s=2.0, evals=1, ckpt_s=0.5,
                ckpts=1)
    paths = rep.report(root)
    rows = rep.table(rep.collect(root))
    assert rows[1]["startup_seconds"] is None and rows[1]["eval_seconds_per_epoch"] is None
    assert rows[1]["time_90_epochs_hours"] == pytest.approx(90 * IMAGES / 720 / 3600)
    md = paths["md"].read_text()
    assert ("| 1 | 2 | 64 | 400.0 | 400.0-400.0 | 2 | 1.00 | 100.0 % | 0:53:23 | 2.00 | 0.50 "
            "| 12.00 | 80.14 |") in md       # 80.0729 + (12 + 90 x 2.5) / 3600
    assert ("| 2 | 4 | 128 | 720.0 | 720.0-720.0 | 2 | 1.80 | 90.0 % | 0:29:39 | n/a | n/a "
            "| n/a | 44.48 \u2020 |") in md
    assert ("\u2020 From the epoch time alone: start-up, evaluations and checkpoints are not "
            "counted, since these runs have no usable time account:\n\n"
            "- 2 node(s): points/n0002/run-1: summary.json has no time account "
            "(an older knl-train)\n") in md
    assert "Evaluation is timed on the study's own validation set" in md
    csv_rows = list(csv.DictReader(paths["csv"].open()))
    assert (csv_rows[0]["eval_seconds_per_epoch"], csv_rows[0]["startup_seconds"]) == ("2.0", "12.0")
    assert (csv_rows[1]["eval_seconds_per_epoch"], csv_rows[1]["startup_seconds"]) == ("", "")
    assert float(csv_rows[1]["time_90_epochs_hours"]) == rows[1]["time_90_epochs_hours"]


def test_no_time_account_anywhere_says_nothing_of_the_validation_set(tmp_path):
    md = rep.report(weak_study(tmp_path))["md"].read_text()
    assert "validation set" not in md
    assert md.count("summary.json has no time account (an older knl-train)") == 8


# ---- errors ------------------------------------------------------------------------------

def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        rep.collect(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "manifest.json") in msg
    assert "knl-train study render" in msg


def test_damaged_manifest_is_a_user_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest.json is damaged"):
        rep.collect(tmp_path)


def test_no_data_at_all_is_a_user_error(tmp_path):
    root = make_study(tmp_path / "s", "strong", [(1, 64, "queued", [None]),
                                                  (2, 64, "running", [None])])
    with pytest.raises(UserError) as e:
        rep.report(root)
    assert str(e.value) == (f"no point of study strong-resnet has a summary.json yet; run "
                            f"`knl-train study status {root}` to see the jobs")
    # collect still recorded why, for `study status`-style inspection.
    results = json.loads((root / "results.json").read_text())
    assert [p["repeats"][0]["reason"] for p in results["points"]] == [
        "no summary.json; job 101 queued", "no summary.json; job 102 running"]


# ---- rates that include the warm-up (issue 16) ---------------------------------------------------

def short_metrics_study(tmp_path):
    """1 node measured at 526 images/s; 2 nodes logged only their warm-up step, so summary.json's
    whole-run 16 images/s (graph building included) is all there is for them."""
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [526, 526]),
                                                (2, 128, "completed", [1000, 1000])])
    for r in range(2):
        write_run(root / f"points/n0002/run-{r}", ranks=4, batch=128, rates=[], summary_ips=16.0)
    return root


def test_point_with_only_a_warmup_inclusive_rate_is_marked_not_the_baseline(tmp_path):
    root = short_metrics_study(tmp_path)
    results = rep.collect(root)
    second = results["points"][1]
    assert (second["warmup_included"], second["images_per_sec"], second["n"]) == (True, 16.0, 2)
    rows = rep.table(results)
    assert [r["warmup_included"] for r in rows] == [False, True]
    assert rep.baseline(rows)["nodes"] == 1
    assert rows[1]["efficiency"] == pytest.approx((16 / 2) / 526)
    md = rep.report(root)["md"].read_text()
    assert "Baseline: 1 node(s), 2 ranks, 526.0 images/s (the smallest node count with data measured " \
           "after the warm-up)." in md
    assert "| 2 | 4 | 128 | 16.0 \u2021 | 16.0-16.0 | 2 | 0.03 | 1.5 % |" in md
    assert ("\u2021 Includes the warm-up (no step records after the 1 warm-up step(s), so summary.json's "
            "whole-run images/s, which includes the warm-up): not comparable with the other points, "
            "and no baseline while a point measured after the warm-up exists:\n\n"
            "- 2 node(s): points/n0002/run-0, points/n0002/run-1\n") in md
    assert "- 2 node(s): 1.5 % (includes the warm-up, \u2021)" in md
    csv_rows = list(csv.DictReader((root / "report" / "scaling.csv").open()))
    assert [c["warmup_included"] for c in csv_rows] == ["false", "true"]


def test_warmup_inclusive_smallest_point_is_skipped_as_baseline(tmp_path):
    root = make_study(tmp_path / "s", "strong", [(1, 64, "completed", [300, 300]),
                                                  (2, 64, "completed", [520, 540])])
    write_run(root / "points/n0001/run-0", ranks=2, batch=64, rates=[], summary_ips=16.0)
    write_run(root / "points/n0001/run-1", ranks=2, batch=64, rates=[], summary_ips=18.0)
    rows = rep.table(rep.collect(root))
    # The 2-node point is the baseline: speed-up 1 and efficiency 100 %, not 530 / 17.
    assert [(r["nodes"], r["images_per_sec"], r["warmup_included"]) for r in rows] == [
        (1, 17.0, True), (2, 530.0, False)]
    assert (rows[1]["speedup"], rows[1]["efficiency"]) == (1.0, 1.0)
    assert rows[0]["speedup"] == pytest.approx(17 / 530)
    md = rep.report(root)["md"].read_text()
    assert "Baseline: 2 node(s), 4 ranks, 530.0 images/s" in md


def test_every_point_warmup_inclusive_keeps_the_smallest_as_a_marked_baseline(tmp_path):
    root = make_study(tmp_path / "s", "weak", [(1, 64, "completed", [None]),
                                                (2, 128, "completed", [None])], repeats=1)
    write_run(root / "points/n0001/run-0", ranks=2, batch=64, rates=[], summary_ips=20.0)
    write_run(root / "points/n0002/run-0", ranks=4, batch=128, rates=[], summary_ips=36.0)
    rows = rep.table(rep.collect(root))
    assert [r["warmup_included"] for r in rows] == [True, True]
    assert rows[1]["efficiency"] == pytest.approx(0.9)
    md = rep.report(root)["md"].read_text()
    assert ("Baseline: 1 node(s), 2 ranks, 20.0 images/s (the smallest node count with data; it too "
            "includes the warm-up, \u2021).") in md
