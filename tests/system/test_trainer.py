"""The trainer on real ranks (mpirun + Horovod): run directory, resume, failure behaviour.

The tiny dataset has 480 training images; with 8 images per rank on 2 ranks an epoch is 30
optimizer steps. Runs that must be bit-comparable set ``deterministic=true``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import yaml

from knl_train.train.checkpoint import latest_state
from tests.support import KNL_TRAIN, SCRIPTS, read_jsonl

pytestmark = pytest.mark.slow  # each test (or its module fixture) trains on 2 ranks for 15-40 s


def train_args(data, run, *extra):
    return [KNL_TRAIN, "train", "--set", f"data.path={data}", "--set", "data.image_size=16",
            "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "log_every=10",
            "--set", "guard.every=10", *extra]


# The exact-resume runs: deterministic, 3 epochs of 30 steps.
EXACT = ("--set", "deterministic=true", "--set", "epochs=3", "--set", "schedule.peak_lr=2.0")


def checkpoint_arrays(run, name):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(run / "checkpoints" / name / "ckpt"))
    names = [n for n in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in n]
    return {n: reader.get_tensor(n) for n in names}


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys() and len(a) > 20  # model weights, BN statistics, slots, step
    worst = max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
                for k in a)
    assert worst <= tol, f"resumed run ends {worst:g} away from the uninterrupted one"


@pytest.fixture(scope="module")
def uninterrupted(launch, tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = launch(*train_args(tiny_dataset, run, *EXACT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return checkpoint_arrays(run, "step-00000090")


# ---- one run, the run directory ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(launch, tiny_dataset, tmp_path_factory):
    """One 2-rank run of 3 epochs (30 steps each), logging every 30 steps: the tests below read
    what it printed (``proc``) and wrote (``run``, ``summary``, ``records``)."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    proc = launch(KNL_TRAIN, "train", "--set", f"data.path={tiny_dataset}", "--set", "data.image_size=16",
                  "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "epochs=3",
                  "--set", "schedule.peak_lr=2.0", "--set", "log_every=30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return SimpleNamespace(run=run, proc=proc, summary=json.loads((run / "summary.json").read_text()),
                           records=read_jsonl(run / "metrics.jsonl"))


def kind(records, name):
    return [r for r in records if r["kind"] == name]


def test_trainer_two_ranks_summary_describes_the_run(two_ranks):
    summary = two_ranks.summary
    assert summary["world_size"] == 2 and summary["controller"] == "mpi"
    assert summary["global_batch"] == 16 and summary["per_rank_batch"] == 8
    assert summary["epochs"] == 3 and summary["steps"] == 3 * (480 // 16)
    assert 0.0 <= summary["top1"] <= 1.0 and summary["images_per_sec"] > 0
    assert summary["versions"]["tensorflow"] == "2.15.1"
    assert summary["versions"]["horovod"] == "0.28.1"


def test_trainer_two_ranks_summary_accounts_for_the_wall_clock(two_ranks):
    s = two_ranks.summary
    parts = ("startup_seconds", "train_seconds", "eval_seconds", "checkpoint_seconds", "other_seconds")
    assert all(s[p] >= 0 for p in parts) and s["train_seconds"] > 0 and s["eval_seconds"] > 0
    assert sum(s[p] for p in parts) == pytest.approx(s["wall_seconds"], rel=0.02)
    assert sorted(s["startup"]) == sorted(["imports", "horovod", "data", "model", "first_step"])
    assert sum(s["startup"].values()) == pytest.approx(s["startup_seconds"], rel=1e-6)
    assert (s["images_trained"], s["epochs_trained"]) == (90 * 16, 3.0)
    assert (s["evaluations"], s["checkpoints"]) == (3, 3)
    assert s["wall_images_per_sec"] == pytest.approx(90 * 16 / s["wall_seconds"])
    eff = 90 * 16 / s["images_per_sec"] / s["wall_seconds"]
    assert s["time_to_train_efficiency"] == pytest.approx(eff) and 0 < eff < 1
    # Rank 0 prints the same account.
    assert re.search(r"wall clock [\d.]+ s: start-up [\d.]+ \(imports [\d.]+, horovod [\d.]+, "
                     r"data [\d.]+, model [\d.]+, first step [\d.]+\), training [\d.]+, "
                     r"evaluation [\d.]+, checkpoints [\d.]+, other [\d.]+", two_ranks.proc.stdout)
    epochs = kind(two_ranks.records, "epoch")
    assert all(r["eval_seconds"] > 0 and r["checkpoint_seconds"] >= 0 for r in epochs)


def test_trainer_two_ranks_epoch_records_evaluate_every_validation_image_once(two_ranks):
    epochs = kind(two_ranks.records, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    # Sharded eval covers the 40 validation images exactly once across the two ranks.
    assert [r["val_count"] for r in epochs] == [40, 40, 40]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert two_ranks.summary["top1"] == epochs[-1]["val_top1"]


def test_trainer_two_ranks_step_records_every_log_every_steps(two_ranks):
    steps = kind(two_ranks.records, "step")
    assert [r["step"] for r in steps] == [30, 60, 90]
    assert all(0.0 <= r["top5"] <= 1.0 and r["top5"] >= r["top1"] for r in steps)
    assert {r["step"]: r["lr"] for r in steps}[30] == pytest.approx(2.0)  # end of warmup: the peak


def test_trainer_two_ranks_trust_ratios_of_the_adapted_variables(two_ranks):
    # LARS trust ratios of the adapted (rank > 1) variables, every log_every steps.
    ratios = kind(two_ranks.records, "trust_ratio")
    assert [r["step"] for r in ratios] == [30, 60, 90]
    assert all(r["count"] == 5 and 0 < r["min"] <= r["median"] <= r["max"] for r in ratios)


def test_trainer_two_ranks_tensorboard_events(two_ranks):
    import tensorflow as tf
    tags = {v.tag for f in (two_ranks.run / "tensorboard").glob("events.out.tfevents.*")
            for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}
    assert {"train/loss", "train/top1", "train/lr", "train/images_per_sec", "val/top1", "val/top5",
            "trust_ratio/median"} <= tags


def test_trainer_two_ranks_config_and_checkpoints(two_ranks):
    run = two_ranks.run
    assert yaml.safe_load((run / "config.yaml").read_text())["per_rank_batch"] == 8
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert {k: latest[k] for k in ("name", "step", "epoch", "batch", "global_batch", "world_size")} == \
        {"name": "step-00000090", "step": 90, "epoch": 3, "batch": 0, "global_batch": 16, "world_size": 2}
    assert latest["config_hash"] == two_ranks.summary["config_hash"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == \
        ["step-00000030", "step-00000060", "step-00000090"]
    assert (run / "checkpoints" / "step-00000090" / "ckpt.index").exists()


def test_trainer_two_ranks_only_rank_zero_prints(two_ranks):
    # Only rank 0 prints: one header line, three epoch lines.
    stdout = two_ranks.proc.stdout
    assert stdout.count("knl-train: 2 ranks (mpi)") == 1
    epoch_lines = [l for l in stdout.splitlines() if l.startswith("epoch ")]
    assert [l.split()[1] for l in epoch_lines] == ["1/3", "2/3", "3/3"]


# ---- resume --------------------------------------------------------------------------------------
def test_killed_after_an_epoch_and_resumed_ends_with_the_same_weights(
        background, launch, tiny_dataset, tmp_path, uninterrupted):
    run = tmp_path / "run"
    job = background(*train_args(tiny_dataset, run, *EXACT))
    # Checkpoints are written in the background, one at a time: once epoch 2 is reported, the
    # first is complete and the second may be in flight. Frozen there (the last epoch is far
    # longer than a signal takes), the job is then killed: nothing gets to clean up.
    job.wait_for(r"^epoch 2/3 ")
    job.freeze()
    job.kill()
    killed_at = latest_state(run / "checkpoints")["step"]
    assert killed_at in (30, 60)
    proc = launch(*train_args(tiny_dataset, run, *EXACT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {run / 'checkpoints' / f'step-{killed_at:08d}'}: step {killed_at}" in proc.stdout
    assert_same_weights(checkpoint_arrays(run, "step-00000090"), uninterrupted)
    # The metrics are those of one run: records past the checkpoint were dropped and rewritten.
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(10, 91, 10))
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == killed_at


def test_sigterm_checkpoints_mid_epoch_exits_cleanly_and_the_rerun_resumes_exactly(
        background, launch, tiny_dataset, tmp_path, uninterrupted):
    run = tmp_path / "run"
    job = background(*train_args(tiny_dataset, run, *EXACT))
    job.wait_for(r"^  step +40 ")
    ranks = job.ranks()
    assert sorted(ranks) == [0, 1]
    for proc in ranks.values():  # as Slurm does at the time limit: every task gets SIGTERM
        proc.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 0, job.output
    m = re.search(r"stopped by SIGTERM at step (\d+): checkpoint (\S+) written; rerun the same "
                  r"command to resume", job.output)
    assert m, job.output
    step = int(m.group(1))
    assert step > 40 and step % 10 == 0 and m.group(2) == str(run / "checkpoints" / f"step-{step:08d}")
    state = latest_state(run / "checkpoints")
    assert state["step"] == step and state["epoch"] * 30 + state["batch"] == step
    assert not (run / "summary.json").exists()

    proc = launch(*train_args(tiny_dataset, run, *EXACT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"step {step}, epoch {state['epoch'] + 1}, batch {state['batch']}") in proc.stdout
    assert_same_weights(checkpoint_arrays(run, "step-00000090"), uninterrupted)


def test_a_time_limit_that_signals_mpirun_too_still_leaves_a_checkpoint(background, tiny_dataset, tmp_path):
    # Slurm at the time limit (and scancel) sends SIGTERM to every process of the job: mpirun
    # included, which then kills the ranks after the launcher's grace period.
    run = tmp_path / "run"
    job = background(*train_args(tiny_dataset, run, "--set", "epochs=50"))
    job.wait_for(r"^  step +40 ")
    ranks = job.ranks()
    launch = psutil.Process(job.proc.pid)
    for proc in [*ranks.values(), *launch.children(), launch]:  # the ranks, mpirun, knl-train launch
        proc.send_signal(signal.SIGTERM)
    assert job.wait(timeout=90) == 0, job.output  # "stopped" exits 0, as the README says
    m = re.search(r"^knl-train: stopped by SIGTERM at step (\d+)", job.output, re.M)
    assert m, job.output
    state = latest_state(run / "checkpoints")
    assert state["step"] == int(m.group(1)) > 40


def test_sigusr1_to_mpirun_is_forwarded_and_stops_the_run_cleanly(background, tiny_dataset, tmp_path):
    # The early warning a job script can ask for (#SBATCH --signal=B:USR1@120) and pass to mpirun.
    run = tmp_path / "run"
    job = background(*train_args(tiny_dataset, run, "--set", "epochs=50"))
    job.wait_for(r"^  step +20 ")
    os.kill(job.proc.pid, signal.SIGUSR1)
    assert job.wait(timeout=90) == 0, job.output
    m = re.search(r"stopped by SIGUSR1 at step (\d+)", job.output)
    assert m, job.output
    assert latest_state(run / "checkpoints")["step"] == int(m.group(1)) > 20


def test_a_changed_global_batch_cannot_resume(launch, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert launch(*train_args(tiny_dataset, run, "--set", "steps=10")).returncode == 0
    proc = launch(*train_args(tiny_dataset, run, "--set", "steps=20", "--set", "per_rank_batch=4"))
    assert proc.returncode == 2
    assert "was written with global batch 16" in proc.stderr and "this run has 8" in proc.stderr
    assert proc.stderr.count("knl-train: error:") == 1 and "Traceback" not in proc.stderr



def test_a_damaged_newest_checkpoint_resumes_from_the_previous_and_none_good_stops(
        launch, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = train_args(tiny_dataset, run, "--set", "epochs=2")
    first = launch(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000030", "step-00000060"]
    # An interrupted write: the newest data file cut short, latest.json torn, a partial metrics line.
    (data,) = (ckpts / "step-00000060").glob("ckpt.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (ckpts / "latest.json").write_text('{"name": "step-000')
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    early = [l for l in lines if json.loads(l).get("step", 0) <= 30]
    assert len(early) >= 4  # steps 10, 20, 30 and epoch 1 at least
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "st')

    proc = launch(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (f"knl-train: warning: skipped checkpoint {ckpts / 'step-00000060'}: its TensorFlow "
            "data cannot be read (") in proc.stderr
    assert f"resuming from {ckpts / 'step-00000030'}: step 30" in proc.stdout
    assert "dropped the cut-off last line" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000030", "step-00000060"]
    assert latest_state(ckpts)["step"] == 60
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 30
    kept = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert kept[:len(early)] == early
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"] == \
        [10, 20, 30, 40, 50, 60]

    # No good checkpoint left: one line, nothing deleted, also with --resume.
    for name in ("step-00000030", "step-00000060"):
        (ckpts / name / "ckpt.index").unlink()
    before = sorted(str(p) for p in run.rglob("*"))
    for extra in ((), ("--resume",)):
        proc = launch(*args, *extra)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert (f"knl-train: error: no usable checkpoint in {ckpts}: step-00000060: its index file "
                "ckpt.index is missing; step-00000030: its index file ckpt.index is missing. "
                "Nothing was changed. Rerun with --fresh to start over") in proc.stderr
        assert proc.stderr.count("knl-train: error:") == 1 and "Traceback" not in proc.stderr
        assert sorted(str(p) for p in run.rglob("*")) == before


def test_a_damaged_metrics_line_stops_every_rank_with_one_line(launch, tiny_dataset, tmp_path):
    """Rank 0 cuts the metrics back while the ranks agree on the checkpoint, so its error reaches
    every rank (not only rank 0, leaving the others to the launcher's teardown)."""
    run = tmp_path / "run"
    assert launch(*train_args(tiny_dataset, run, "--set", "epochs=1")).returncode == 0
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(["not json\n", *lines[1:]]))
    proc = launch(*train_args(tiny_dataset, run, "--set", "epochs=2"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"knl-train: error: {run / 'metrics.jsonl'} line 1 is not JSON" in proc.stderr
    assert proc.stderr.count("knl-train: error:") == 1 and "Traceback" not in proc.stderr
    assert (run / "metrics.jsonl").read_text().startswith("not json\n")  # left as it was


# ---- failure behaviour ---------------------------------------------------------------------------
def test_a_rank_killed_with_sigkill_takes_the_job_down_within_60_s(background, tiny_dataset, tmp_path):
    job = background(*train_args(tiny_dataset, tmp_path / "run", "--set", "epochs=50"))
    job.wait_for(r"^  step +10 ")
    ranks = job.ranks()
    t0 = time.monotonic()
    ranks[1].kill()
    rc = job.wait(timeout=90)
    elapsed = time.monotonic() - t0
    print(f"job down {elapsed:.1f} s after the kill")
    assert rc != 0 and elapsed < 60, (rc, elapsed)
    assert re.search(r"process rank 1 with PID \d+ .*exited on signal 9", job.output.replace("\n", " ")), job.output
    assert _gone(ranks[0])


def _gone(proc) -> bool:
    import psutil
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # exited; only its exit status is left
    except psutil.NoSuchProcess:
        return True


def test_a_non_finite_loss_names_the_step_the_lr_and_the_last_good_checkpoint(launch, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    sgd = ("--set", "optimizer.name=sgd", "--set", "schedule.warmup_epochs=0")
    assert launch(*train_args(tiny_dataset, run, *sgd, "--set", "epochs=1")).returncode == 0
    # Continue it with an absurd learning rate: the loss overflows within a few steps.
    proc = launch(*train_args(tiny_dataset, run, *sgd, "--set", "epochs=2", "--set", "schedule.peak_lr=1e38"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    m = re.search(r"knl-train: error: the loss is not finite \(nan or inf\) at step (\d+) \(epoch 2\), "
                  r"learning rate (\S+); the last good checkpoint is (\S+)\. Lower schedule.peak_lr", proc.stderr)
    assert m, proc.stderr
    assert 30 < int(m.group(1)) <= 60 and float(m.group(2)) > 1e30
    assert m.group(3) == str(run / "checkpoints" / "step-00000030")
    assert proc.stderr.count("knl-train: error:") == 1 and "Traceback" not in proc.stderr
    assert latest_state(run / "checkpoints")["step"] == 30


def test_a_failed_checkpoint_write_stops_every_rank_and_keeps_the_previous(launch, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    # Where the second checkpoint's temporary directory must go (a read-only directory would do,
    # but not for root, whom these tests may run as).
    (run / "checkpoints" / ".step-00000060.tmp").write_text("in the way")
    proc = launch(*train_args(tiny_dataset, run, "--set", "epochs=3"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-00000060'}" in proc.stderr
    assert f"The previous checkpoint ({run / 'checkpoints' / 'step-00000030'}) is intact" in proc.stderr
    assert proc.stderr.count("knl-train: error:") == 1 and "Traceback" not in proc.stderr
    assert latest_state(run / "checkpoints")["step"] == 30
    assert (run / "checkpoints" / "step-00000030" / "ckpt.index").exists()


def test_ranks_that_do_not_average_are_stopped_by_the_divergence_guard(launch, tiny_dataset, tmp_path):
    proc = launch(sys.executable, SCRIPTS / "no_average.py", *train_args(tiny_dataset, tmp_path / "run")[1:])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "knl-train: error: ranks hold different weights at step 10: rank(s) 1 differ from rank 0" \
        in proc.stderr
    assert "TF >= 2.16 / Keras 3" in proc.stderr and "Traceback" not in proc.stderr


# ---- accumulation, precision, Horovod knobs, steps, timed checkpoints ----------------------------
def test_accumulation_keeps_lr_and_step_accounting_with_bf16_and_fp16_allreduce(launch, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = launch(*train_args(
        tiny_dataset, run, "--set", "per_rank_batch=4", "--set", "horovod.backward_passes_per_step=2",
        "--set", "steps=45", "--set", "precision=mixed_bf16", "--set", "horovod.compression=fp16",
        "--set", "horovod.fusion_threshold_mb=1", "--set", "horovod.cycle_time_ms=2",
        "--set", "label_smoothing=0.1", "--set", "checkpoint.every_minutes=0.000001",
        "--set", "checkpoint.keep=10", "--set", "eval.every_epochs=5", "--set", "schedule.peak_lr=2.0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["global_batch"], summary["per_rank_batch"], summary["backward_passes_per_step"]) == (16, 4, 2)
    assert (summary["steps"], summary["epochs"], summary["precision"]) == (45, 2, "mixed_bf16")
    assert summary["horovod"] == {"fusion_threshold_bytes": 1048576, "cycle_time_ms": 2.0, "compression": "fp16"}
    assert 0.0 <= summary["top1"] <= 1.0
    records = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [10, 20, 30, 40, 45]
    # The LR follows optimizer updates, not micro-batches: warmup peaks at step 30 (one epoch).
    from knl_train.optim.schedules import build_lr_schedule
    schedule = build_lr_schedule("poly", steps_per_epoch=30, epochs=1.5, peak_lr=2.0, warmup_epochs=1)
    assert [r["lr"] for r in steps] == pytest.approx([float(schedule(r["step"])) for r in steps], rel=1e-5)
    # Evaluated once, at the end (every 5 epochs, and always at the end).
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [(r["epoch"], "val_top1" in r) for r in epochs] == [(1, False), (2, True)]
    # Timed checkpoints at each agreement (every 10 steps), at update boundaries.
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-00000010", "step-00000020", "step-00000030", "step-00000040", "step-00000045"]
    state = json.loads((run / "checkpoints" / "step-00000010" / "state.json").read_text())
    assert (state["epoch"], state["batch"]) == (0, 20)  # 10 updates = 20 micro-batches
