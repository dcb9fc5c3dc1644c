"""The convergence report's files: the CSV against each run's own summary.json, the Markdown, a
study where nothing is usable (still a table), and one where nothing has run (an error)."""

from __future__ import annotations

import csv
import json

import pytest

from knl_train.errors import UserError
from knl_train.studies import accuracy_report as ar
from knl_train.studies import report as rep
from knl_train.studies.manifest import Manifest
from tests.unit.studies.test_accuracy import CURVES, pid, point, save_manifest, study, write_run


def test_csv_matches_each_runs_summary(tmp_path):
    root = study(tmp_path)
    paths = ar.report(root)
    assert paths["csv"] == root / "report" / "convergence.csv"
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(ar.COLUMNS)
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
        assert (row["reason"], row["output"]) == ("", "")
    statuses = {r["id"]: r["status"] for r in back}
    assert statuses[pid("lars", 4096, 4.0)] == "diverged"
    assert statuses[pid("sgd-goyal", 4096, 0.2)] == "missing"


def test_markdown(tmp_path):
    md = ar.report(study(tmp_path))["md"].read_text()
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
    assert gone == (
        "- lars-b004096-lr4-r0: diverged: the loss is not finite at step 7; no summary.json; "
        "job 12 failed\n- sgd-goyal-b004096-lr0.2-r0: missing: no summary.json; job 13 pending\n")


def test_one_epoch_is_singular(tmp_path):
    root = tmp_path / "s"
    p = point("lars", 256, 1.0)
    write_run(root / p.run_dirs[0], 256, [0.5])
    save_manifest(root, [p], epochs=1)
    md = ar.report(root)["md"].read_text()
    assert "Each point is one run of 1 epoch. " in md


def test_report_out_dir_and_dispatch_from_the_scaling_report(tmp_path):
    root = study(tmp_path)
    paths = rep.report(root, out=tmp_path / "elsewhere")
    assert paths["md"] == tmp_path / "elsewhere" / "convergence.md"
    assert rep.collect(root)["kind"] == "convergence"


# ---- nothing usable, nothing run ---------------------------------------------------------------

def test_a_study_without_a_usable_run_still_gets_its_table(tmp_path):
    """Every run diverged or failed: the CSV and the Markdown say why for each point, the
    verdict says no accuracy was measured, the chart against batch (empty) is not drawn, and an
    earlier report's is removed; the curves of the epochs evaluated before diverging are."""
    root = tmp_path / "s"
    pts = [point("lars", 256, 1.0, state="failed"), point("lars", 256, 2.0, state="failed",
                                                          job_id="14")]
    write_run(root / pts[0].run_dirs[0], 256, [0.1], top1=None,
              extra={"train_loss": float("nan")})
    (root / "points" / pts[1].id).mkdir(parents=True)
    (root / "points" / pts[1].id / "local-14.out").write_text(
        "knl-train: error: dataset path /data/nope does not exist\n")
    save_manifest(root, pts)
    (root / "report").mkdir()
    (root / "report" / "convergence.png").write_bytes(b"an earlier report's chart")
    paths = ar.report(root)
    assert set(paths) == {"results", "csv", "md", "curves"}
    assert not (root / "report" / "convergence.png").exists()
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("diverged", f"{pts[0].run_dirs[0]}: the loss is not finite"),
        ("failed", f'no summary.json; job 14 failed; points/{pts[1].id}/local-14.out says '
                   '"dataset path /data/nope does not exist"')]
    md = paths["md"].read_text()
    assert "## Verdict" in md and "\n- lars: no accuracy measured\n" in md
    assert "| 256 | 2 | — | — | — | — | — | — | — | — | 1: diverged, 2: failed |" \
        in md
    assert f"- {pts[1].id}: failed: no summary.json; job 14 failed;" in md


def test_nothing_drawn_when_no_epoch_was_evaluated(tmp_path):
    root = tmp_path / "s"
    p = point("lars", 256, 1.0, state="failed", job_id="9")
    (root / "points" / p.id).mkdir(parents=True)
    (root / "points" / p.id / "slurm-9.out").write_text("srun: error: node lost\n")
    save_manifest(root, [p])
    paths = ar.report(root)
    assert set(paths) == {"results", "csv", "md"}
    assert sorted(f.name for f in (root / "report").iterdir()) == ["convergence.csv",
                                                                    "convergence.md"]
    assert "see points/lars-b000256-lr1-r0/slurm-9.out" in paths["md"].read_text()


def test_a_study_none_of_whose_points_has_run_is_a_user_error(tmp_path):
    """Rendered, or submitted and pending: no run directory, no job output, nothing to say."""
    root = tmp_path / "s"
    save_manifest(root, [point("lars", 256, 1.0, state="rendered", job_id=None),
                         point("lars", 256, 2.0, state="pending", job_id="13"),
                         point("lars", 256, 4.0, state="pending", job_id="14")])
    with pytest.raises(UserError) as e:
        ar.report(root)
    assert str(e.value) == (
        f"no point of study lb-test has run yet (no run directory or job output under "
        f"{root / 'points'}; jobs: 1 rendered, 2 pending): submit it with `knl-train study "
        f"submit {root}`, or wait for it with `knl-train study status {root} --wait`")
    assert not (root / "report").exists()


# ---- errors ----------------------------------------------------------------------------------

def test_damaged_manifest_is_a_user_error_naming_it(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest.json is damaged"):
        ar.report(tmp_path)
