"""Scaling studies end to end through a real Slurm (tests/support/slurm_cluster.py).

render -> submit (sbatch) -> status (squeue; accounting is off, as on many clusters) -> collect
-> report, with real ranks training a tiny model. The 2-node cluster is two slurmd on this host:
its timings mean nothing, so the report's numbers are checked against the runs' own files, not
against expectations of speed.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import FIXTURES, ROOT, ok, read_jsonl, run_cli

# The jobs start real ranks (mpirun, srun); a study takes 20-35 s.
pytestmark = [pytest.mark.mpi, pytest.mark.slow]

STUDIES = FIXTURES / "studies"
IMAGENET = 1_281_167


def _spec(tmp_path: Path, name: str, **fields) -> Path:
    spec = {"name": name, "train": {"config": str(STUDIES / "tiny.yaml")}, "steps": 4,
            "warmup_steps": 1, "walltime": "00:05:00", **fields}
    path = tmp_path / f"{name.replace(' ', '-')}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path



def _median_after_warmup(run_dir: Path, warmup: int) -> float:
    rates = [r["images_per_sec"] for r in read_jsonl(run_dir / "metrics.jsonl")
             if r.get("kind") == "step" and r["step"] > warmup]
    assert rates, f"no step records after the warm-up in {run_dir}"
    return statistics.median(rates)


# ---- a weak study on two fake nodes, end to end -------------------------------------------------
@pytest.fixture(scope="module")
def weak_study(slurm2, tmp_path_factory):
    """A weak study of 1 and 2 nodes rendered, submitted and waited for; the tests below check
    what each later step sees."""
    tmp_path = tmp_path_factory.mktemp("weak")
    env = slurm2.env()
    spec = _spec(tmp_path, "e2e weak", site=str(STUDIES / "ci-slurm.yaml"), nodes=[1, 2],
                 ranks_per_node=1, scaling="weak", per_rank_batch=8)
    out = tmp_path / "study"
    ok(run_cli("study", "render", spec, "--out", out, env=env))
    submitted = ok(run_cli("study", "submit", out, env=env))
    ids = [p["job"]["id"] for p in json.loads((out / "manifest.json").read_text())["points"]]
    ok(run_cli("study", "status", out, "--wait", "--timeout", "600", env=env, timeout=700))
    return SimpleNamespace(out=out, env=env, submitted=submitted, ids=ids)


def test_weak_study_submit_records_one_job_per_point(weak_study):
    assert "2 job(s) submitted, 0 already submitted" in weak_study.submitted.stdout
    ids = weak_study.ids
    assert all(i and i.isdigit() for i in ids) and len(set(ids)) == 2


def test_weak_study_status_comes_from_squeue_without_accounting(weak_study, slurm2):
    rows = json.loads(ok(run_cli("study", "status", weak_study.out, "--json", env=weak_study.env)).stdout)
    assert [(r["id"], r["state"], r["exit_code"], r["runs_done"]) for r in rows] == \
        [("n0001", "completed", 0, 1), ("n0002", "completed", 0, 1)]
    # The scheduler answered (squeue keeps finished jobs for MinJobAge), though sacct cannot.
    assert {r["source"] for r in rows} == {"squeue"}
    assert slurm2.run("sacct", "-j", weak_study.ids[0]).returncode != 0


def test_weak_study_second_submit_queues_nothing(weak_study, slurm2):
    # Idempotent: a second submit queues nothing (the session's cluster may hold other tests' jobs).
    def queued():
        return sorted(slurm2.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split(), key=int)
    before = queued()
    assert set(weak_study.ids) <= set(before)
    again = ok(run_cli("study", "submit", weak_study.out, env=weak_study.env))
    assert "0 job(s) submitted, 2 already submitted" in again.stdout
    assert queued() == before


def test_weak_study_jobs_write_their_own_records(weak_study):
    # The jobs' own records: what status falls back on once squeue has forgotten them.
    ids = weak_study.ids
    for point, job_id, nodelist in (("n0001", ids[0], "n1"), ("n0002", ids[1], "n[1-2]")):
        record = json.loads((weak_study.out / "points" / point / f"job-{job_id}.json").read_text())
        assert (record["state"], record["exit_code"], record["nodelist"]) == ("finished", 0, nodelist)


def test_weak_study_collect_writes_results(weak_study):
    ok(run_cli("study", "collect", weak_study.out, env=weak_study.env))
    results = json.loads((weak_study.out / "results.json").read_text())
    assert [p["id"] for p in results["points"]] == ["n0001", "n0002"]


def test_weak_study_report_matches_the_runs_own_files(weak_study):
    out = weak_study.out
    report = ok(run_cli("study", "report", out, env=weak_study.env))
    assert "| nodes |" in report.stdout
    rows = list(csv.DictReader((out / "report" / "scaling.csv").open()))
    assert [int(r["nodes"]) for r in rows] == [1, 2]
    x = {}
    for row, point in zip(rows, ("n0001", "n0002")):
        run = out / "points" / point / "run-0"
        summary = json.loads((run / "summary.json").read_text())
        assert int(row["ranks"]) == summary["world_size"] == int(point[1:])
        assert int(row["global_batch"]) == summary["global_batch"] == 8 * summary["world_size"]
        assert summary["steps"] == 4
        x[point] = _median_after_warmup(run, warmup=1)
        assert float(row["images_per_sec"]) == pytest.approx(x[point], rel=1e-9)
        assert float(row["epoch_seconds"]) == pytest.approx(IMAGENET / x[point], rel=1e-9)
        # One repeat: its own time account; tiny.yaml evaluates and checkpoints every epoch.
        extra = 0.0 if summary.get("startup_seconds") is None else summary["startup_seconds"] + 90 * (
            summary["eval_seconds"] / max(summary["evaluations"], 1)
            + summary["checkpoint_seconds"] / max(summary["checkpoints"], 1))
        assert float(row["time_90_epochs_hours"]) == pytest.approx(
            (90 * IMAGENET / x[point] + extra) / 3600, rel=1e-9)
    assert float(rows[0]["efficiency"]) == pytest.approx(1.0)
    assert float(rows[1]["speedup"]) == pytest.approx(x["n0002"] / x["n0001"], rel=1e-9)
    assert float(rows[1]["efficiency"]) == pytest.approx((x["n0002"] / 2) / x["n0001"], rel=1e-9)
    png = out / "report" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- srun and failures --------------------------------------------------------------------------
def test_srun_binds_ranks_with_the_presets_masks(slurm, tmp_path):
    """srun --mpi=pmix starts Horovod ranks directly, bound by --cpu-bind=mask_cpu from the plan."""
    env = slurm.env()
    spec = _spec(tmp_path, "srun strong", site=str(STUDIES / "ci-slurm-srun.yaml"), nodes=[1],
                 ranks_per_node=2, scaling="strong", global_batch=16)
    out = tmp_path / "study"
    ok(run_cli("study", "render", spec, "--out", out, env=env))
    script = (out / "points" / "n0001" / "job.sbatch").read_text()
    assert "--cpu-bind=mask_cpu:0x1,0x2" in script and "--cpus-per-task=1" in script
    ok(run_cli("study", "submit", out, env=env))
    ok(run_cli("study", "status", out, "--wait", "--timeout", "600", env=env, timeout=700))
    summary = json.loads((out / "points" / "n0001" / "run-0" / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["per_rank_batch"]) == (2, 16, 8)
    log = next((out / "points" / "n0001").glob("slurm-*.out")).read_text()
    # knl-train exec warns when the launcher bound a rank elsewhere than its plan: srun did not.
    assert "launcher bound" not in log, log
    assert "2 ranks (mpi)" in log


def test_a_failing_job_is_reported_failed_with_its_exit_code(slurm, tmp_path):
    env = slurm.env()
    spec = _spec(tmp_path, "fails", site=str(STUDIES / "ci-slurm.yaml"), nodes=[1],
                 ranks_per_node=1, scaling="weak", per_rank_batch=8)
    out = tmp_path / "study"
    ok(run_cli("study", "render", spec, "--out", out, env=env))
    # Break the run after rendering: the dataset the jobs will read does not exist.
    train = out / "train.yaml"
    train.write_text(train.read_text().replace("format: synthetic", "format: folder")
                     .replace("path: data/demo", f"path: {tmp_path / 'missing'}")
                     .replace(f"path: {ROOT / 'data' / 'demo'}", f"path: {tmp_path / 'missing'}"))
    ok(run_cli("study", "submit", out, env=env))
    waited = run_cli("study", "status", out, "--wait", "--timeout", "600", env=env, timeout=700)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    row = json.loads(ok(run_cli("study", "status", out, "--json", env=env)).stdout)[0]
    assert (row["state"], row["runs_done"]) == ("failed", 0)
    assert row["exit_code"] not in (None, 0)
    job_id = row["job_id"]
    record = json.loads((out / "points" / "n0001" / f"job-{job_id}.json").read_text())
    assert (record["state"], record["exit_code"]) == ("finished", row["exit_code"])
    collected = run_cli("study", "report", out, env=env)
    assert collected.returncode == 2 and "has a summary.json yet" in collected.stderr
