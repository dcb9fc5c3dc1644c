"""Study jobs that cannot double, through a real Slurm (tests/support/slurm_cluster.py).

A submission cut off after sbatch queued the job, whose job then ran and aged out of squeue
(accounting is off, as on many clusters), is found again from the job's own record instead of
being submitted twice; status reads that record, and says so when the controller cannot be
asked; `submit --retry-failed` then runs the failed point again, and its training resumes from
the checkpoint the failed job left. Aging out is simulated by a squeue that knows no job
(MinJobAge is 600 s here); every other command is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import FIXTURES, ok, run_cli
from tests.support.localqueue import until

# Two jobs of a tiny model on one rank: about 20-40 s.
pytestmark = [pytest.mark.mpi, pytest.mark.slow]

STUDIES = FIXTURES / "studies"


def _command(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return bin_dir


def _with_squeue(env: dict, bin_dir: Path) -> dict:
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


def _ended(point_dir: Path, job_id: str) -> dict:
    """The job's own record once it says the job has ended (written by its exit trap)."""
    def read():
        try:
            record = json.loads((point_dir / f"job-{job_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("state") == "finished" else None
    return until(read, timeout=240)


def test_a_job_aged_out_of_squeue_is_not_submitted_twice_and_a_retry_resumes(slurm, tmp_path):
    env = slurm.env()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "name": "retry me", "train": {"config": str(STUDIES / "tiny.yaml")}, "steps": 4,
        "warmup_steps": 1, "walltime": "00:05:00", "site": str(STUDIES / "ci-slurm.yaml"),
        "nodes": [1], "ranks_per_node": 1, "scaling": "weak", "per_rank_batch": 8}))
    out = tmp_path / "study"
    ok(run_cli("study", "render", spec, "--out", out, env=env))
    point_dir = out / "points" / "n0001"
    script = point_dir / "job.sbatch"
    rendered = script.read_text()
    assert "#SBATCH --no-requeue" in rendered   # ci-slurm does not allow requeueing
    # The first job trains 2 of the 4 steps (checkpointing at the end), then fails as if its
    # node had died.
    script.write_text(rendered.replace("--set steps=4", "--set steps=2").replace("exit $status", "exit 3"))
    # A submit cut off after sbatch queued the job: the manifest says "submitting", no id.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["points"][0]["job"] = {"id": None, "state": "submitting"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    first = slurm.run("sbatch", "--parsable", script, cwd=point_dir)
    assert first.returncode == 0, first.stdout + first.stderr
    job1 = first.stdout.strip().split(";")[0]
    assert _ended(point_dir, job1)["exit_code"] == 3
    job_name = manifest["points"][0]["job_name"]

    # squeue has forgotten the job, and sacct cannot help (no accounting here).
    aged = _with_squeue(env, _command(tmp_path / "aged", "squeue", "exit 0"))
    sacct = slurm.run("sacct", "-n", "-X", f"--name={job_name}", "-S", "now-1days")
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr.lower()
    again = ok(run_cli("study", "submit", out, env=aged))
    assert f"n0001: found job {job1} (its own record), submitted before an interruption" in again.stdout
    assert "0 job(s) submitted, 1 already submitted" in again.stdout
    listed = slurm.run("squeue", "-h", "-t", "all", f"--name={job_name}", "-o", "%i").stdout.split()
    assert listed == [job1]
    row = json.loads(ok(run_cli("study", "status", out, "--json", env=aged)).stdout)[0]
    assert (row["job_id"], row["state"], row["exit_code"], row["source"]) == (job1, "failed", 3, "job record")

    # The controller down: status says so in one line and reads the job's record.
    down = _with_squeue(env, _command(tmp_path / "down", "squeue", "echo 'squeue: error: Unable to "
                                      "contact slurm controller (connect failure)' >&2; exit 1"))
    status = ok(run_cli("study", "status", out, env=down))
    warning = [line for line in status.stderr.splitlines() if "could not be asked" in line]
    assert len(warning) == 1 and "Unable to contact slurm controller" in warning[0], status.stderr
    assert "scontrol ping" in warning[0] and "Traceback" not in status.stderr
    assert status.stdout.splitlines()[1].split()[:7] == ["n0001", "1", job1, "failed", "3", "1/1", "job"]

    # --retry-failed: the same script and run directory; the training resumes at step 2.
    script.write_text(rendered)
    retried = ok(run_cli("study", "submit", out, "--retry-failed", env=env))
    assert f"n0001: job {job1} failed: submitting it again (retry 1)" in retried.stdout
    job2 = json.loads((out / "manifest.json").read_text())["points"][0]["job"]["id"]
    assert job2 != job1 and _ended(point_dir, job2)["exit_code"] == 0
    ok(run_cli("study", "status", out, env=env))
    job = json.loads((out / "manifest.json").read_text())["points"][0]["job"]
    assert (job["id"], job["state"], job["exit_code"]) == (job2, "completed", 0)
    assert (job["retries"], job["earlier"]) == (1, [job1])
    summary = json.loads((point_dir / "run-0" / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (2, 4)
    # A retry after it is finished submits nothing.
    assert "0 job(s) submitted, 1 already submitted" in ok(
        run_cli("study", "submit", out, "--retry-failed", env=env)).stdout
    report = ok(run_cli("study", "report", out, env=env))
    assert f"Point n0001 was retried 1 time(s) (earlier job(s) {job1})" in report.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["points"][0]["job"]["retries"] == 1
