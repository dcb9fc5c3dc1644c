"""The real Slurm test clusters (tests/support/slurm_cluster.py): jobs run, daemons go away."""

from __future__ import annotations

import os
import socket

import pytest

from tests.support.slurm_cluster import SlurmCluster, available

pytestmark = pytest.mark.slurm  # every test starts a real Slurm (two start their own)
needs_slurm = pytest.mark.skipif(available() is not None, reason=available() or "")


def submit_wait(cluster, tmp_path, *sbatch_args, script):
    """``sbatch --parsable --wait`` on ``cluster``; returns (job id, output file text)."""
    proc = cluster.run("sbatch", "--parsable", "--wait", *sbatch_args,
                       "-o", tmp_path / "out-%j.txt", "--wrap", script, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr + cluster.log_tail()
    job_id = int(proc.stdout.strip().split(";")[0])
    return job_id, (tmp_path / f"out-{job_id}.txt").read_text()


def test_single_node_job_runs_and_stays_visible_without_accounting(slurm, tmp_path):
    job_id, out = submit_wait(slurm, tmp_path, "-N1", "-n2",
                              script="srun --cpus-per-task=1 hostname; "
                                     "echo NODELIST=$SLURM_JOB_NODELIST")
    lines = out.splitlines()
    assert lines == [socket.gethostname()] * 2 + ["NODELIST=localhost"], out

    # MinJobAge=600 keeps finished jobs in squeue, which is all we have without accounting.
    state = slurm.run("squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T", timeout=30)
    assert state.returncode == 0, state.stderr
    assert state.stdout.strip() == "COMPLETED"

    sacct = slurm.run("sacct", "-j", job_id, timeout=30)
    assert sacct.returncode != 0, sacct.stdout
    assert "accounting storage is disabled" in sacct.stderr.lower(), sacct.stderr


def test_two_fake_nodes_run_one_task_each(slurm2, tmp_path):
    _, out = submit_wait(slurm2, tmp_path, "-N2", "--ntasks-per-node=1",
                         script="srun printenv SLURMD_NODENAME; echo NODELIST=$SLURM_JOB_NODELIST")
    lines = out.splitlines()
    assert sorted(lines[:-1]) == ["n1", "n2"], out
    assert lines[-1] == "NODELIST=n[1-2]", out


def test_clusters_do_not_share_ports_or_config(slurm, slurm2):
    assert slurm.env()["SLURM_CONF"] != slurm2.env()["SLURM_CONF"]
    ports = {slurm.ctld_port, slurm2.ctld_port, *slurm.node_ports.values(), *slurm2.node_ports.values()}
    assert len(ports) == 5
    nodes = slurm2.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=30)
    assert sorted(nodes.stdout.splitlines()) == ["n1 idle", "n2 idle"], nodes.stdout


@needs_slurm
def test_stop_leaves_no_daemon_behind(tmp_path):
    cluster = SlurmCluster(tmp_path / "c", ("n1", "n2"))
    with cluster:
        pids = cluster.pids()
        assert sorted(pids) == ["slurmctld", "slurmd-n1", "slurmd-n2"]
        for pid in pids.values():
            os.kill(pid, 0)  # alive
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    cluster.stop()  # idempotent


@needs_slurm
def test_start_failure_raises_with_the_daemon_logs(tmp_path):
    cluster = SlurmCluster(tmp_path / "c")
    # Occupy the slurmd port so that slurmd cannot start.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("0.0.0.0", cluster.node_ports["localhost"]))
        busy.listen()
        with pytest.raises(RuntimeError) as err:
            cluster.start(timeout=20)
    msg = str(err.value)
    assert "did not start" in msg
    assert "slurmctld.log ---" in msg and "slurmd.log ---" in msg
    assert "Address already in use" in msg  # slurmd's own reason, from its log
    assert not cluster.pids()
