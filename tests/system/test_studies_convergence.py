"""Convergence studies end to end: real 2-rank trainings through the ``local`` site (this node,
points one after another) and through a real Slurm (tests/support/slurm_cluster.py).

render -> submit -> status --wait -> collect -> report, on the tiny JPEG dataset. The report's
numbers are checked against each run's own summary.json and metrics.jsonl, not against
expectations of accuracy: 2 epochs of a 4-class toy teach little.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import FIXTURES, clean_env, ok, read_jsonl, run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

STUDIES = FIXTURES / "studies"


def _spec(tmp_path: Path, data: Path, site: str) -> Path:
    """Two points: LARS at global batches 16 (no accumulation) and 32 (2 micro-batches)."""
    spec = {"name": "conv e2e", "kind": "convergence", "site": site, "nodes": 1, "ranks_per_node": 2,
            "per_rank_batch": 8, "global_batches": [16, 32], "epochs": 2, "walltime": "00:05:00",
            "train": {"config": str(STUDIES / "tiny.yaml"),
                      "set": {"data.format": "folder", "data.path": str(data), "data.image_size": 16}},
            "optimizers": {"lars": {"set": {"optimizer.name": "lars"}, "lr": [0.5]}},
            "target_top1": 0.3}
    path = tmp_path / "conv.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path



def _run_study(tmp_path: Path, data: Path, site: str, env: dict) -> SimpleNamespace:
    out = tmp_path / "study"
    ok(run_cli("study", "render", _spec(tmp_path, data, site), "--out", out, env=env))
    submitted = ok(run_cli("study", "submit", out, env=env))
    ok(run_cli("study", "status", out, "--wait", "--timeout", "600", env=env, timeout=700))
    manifest = json.loads((out / "manifest.json").read_text())
    return SimpleNamespace(out=out, env=env, submitted=submitted, manifest=manifest)


def _check_report(study: SimpleNamespace) -> None:
    """The CSV's numbers are each run's own: final top-1/top-5, updates, best and time to target."""
    out = study.out
    ok(run_cli("study", "report", out, env=study.env))
    rows = list(csv.DictReader((out / "report" / "convergence.csv").open()))
    assert sorted((int(r["global_batch"]), r["optimizer"]) for r in rows) == [(16, "lars"), (32, "lars")]
    for row in rows:
        point = next(p for p in study.manifest["points"] if int(p["global_batch"]) == int(row["global_batch"]))
        run = out / point["run_dirs"][0]
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["world_size"], summary["global_batch"]) == (2, int(row["global_batch"]))
        assert summary["backward_passes_per_step"] == point["accumulation"] == int(row["global_batch"]) // 16
        assert float(row["top1"]) == pytest.approx(summary["top1"], abs=1e-12)
        assert float(row["top5"]) == pytest.approx(summary["top5"], abs=1e-12)
        assert int(float(row["updates"])) == summary["steps"]
        epochs = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "epoch"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        assert float(row["best_top1"]) == pytest.approx(max(e["val_top1"] for e in epochs), abs=1e-12)
        reached = [e for e in epochs if e["val_top1"] >= 0.3]
        if reached:
            assert int(float(row["epochs_to_target"])) == reached[0]["epoch"]
            assert float(row["seconds_to_target"]) == pytest.approx(reached[0]["wall_seconds"], abs=1e-9)
        else:
            assert row["epochs_to_target"] == "" and row["seconds_to_target"] == ""
    md = (out / "report" / "convergence.md").read_text()
    assert "lars" in md and "16" in md and "32" in md
    for png in ("convergence.png", "convergence-curves.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the local site -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_study(tiny_dataset, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("conv-local")
    # The local queue lives under XDG_STATE_HOME: a private one for this test.
    env = {**clean_env(), "XDG_STATE_HOME": str(tmp_path / "state")}
    return _run_study(tmp_path, tiny_dataset, "local", env)


def test_local_study_submits_one_job_per_point_and_runs_each_once(local_study):
    assert "2 job(s) submitted, 0 already submitted" in local_study.submitted.stdout
    ids = [p["job"]["id"] for p in local_study.manifest["points"]]
    assert len(set(ids)) == 2
    for p in local_study.manifest["points"]:
        # The job's own record, and exactly one training in its run directory.
        record = json.loads((local_study.out / "points" / p["id"] / f"job-{p['job']['id']}.json").read_text())
        assert (record["state"], record["exit_code"]) == ("finished", 0)
        summary = json.loads((local_study.out / p["run_dirs"][0] / "summary.json").read_text())
        assert summary["resumed_from_step"] is None


def test_local_study_status_and_second_submit(local_study):
    rows = json.loads(ok(run_cli("study", "status", local_study.out, "--json", env=local_study.env)).stdout)
    assert [(r["state"], r["exit_code"], r["source"]) for r in rows] == [("completed", 0, "local")] * 2
    again = ok(run_cli("study", "submit", local_study.out, env=local_study.env))
    assert "0 job(s) submitted, 2 already submitted" in again.stdout


def test_local_study_report_matches_the_runs_own_files(local_study):
    _check_report(local_study)


# ---- the same study on Slurm --------------------------------------------------------------------
def test_slurm_convergence_study_end_to_end(slurm, tiny_dataset, tmp_path):
    study = _run_study(tmp_path, tiny_dataset, str(STUDIES / "ci-slurm.yaml"), slurm.env())
    scripts = sorted((study.out / "points").glob("*/job.sbatch"))
    assert len(scripts) == 2
    assert all("--set horovod.backward_passes_per_step=" in s.read_text() for s in scripts)
    _check_report(study)
