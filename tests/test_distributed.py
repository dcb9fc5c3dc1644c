"""Real multi-process runs: mpirun (and horovodrun --gloo) with 2 ranks and a real Horovod."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import HELPERS, KNL_TRAIN, read_jsonl


def _arrays(npz, prefix):
    return {k: npz[k] for k in npz.files if k.startswith(prefix)}


@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_two_ranks_end_bit_identical_with_lower_loss(launch, tmp_path, controller):
    proc = launch(sys.executable, HELPERS / "hvd_steps.py", tmp_path, 20, controller=controller)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert int(r0["size"]) == 2 and str(r0["controller"]) == controller
    # Trainable weights agree bit for bit from the allreduce alone; after averaging the BN
    # moving statistics, every variable does.
    for prefix, min_count in (("t", 10), ("w", 18)):
        a, b = _arrays(r0, prefix), _arrays(r1, prefix)
        assert a.keys() == b.keys() and len(a) >= min_count
        for name in a:
            assert a[name].tobytes() == b[name].tobytes(), f"rank weights differ in {name}"
    # Training moved the weights and lowered the loss on a held-out batch.
    assert float(r0["after"]) < 0.8 * float(r0["before"])
    assert float(r0["before"]) == float(r1["before"])


def test_trainer_two_ranks_writes_run_directory(launch, tmp_path, tiny_dataset):
    run = tmp_path / "run"
    proc = launch(KNL_TRAIN, "train", "--set", f"data.path={tiny_dataset}", "--set", "data.image_size=16",
                  "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "epochs=3",
                  "--set", "schedule.peak_lr=2.0", "--set", "log_every=30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["controller"] == "mpi"
    assert summary["global_batch"] == 16 and summary["per_rank_batch"] == 8
    assert summary["epochs"] == 3 and summary["steps"] == 3 * (480 // 16)
    assert 0.0 <= summary["top1"] <= 1.0 and summary["images_per_sec"] > 0
    assert summary["versions"]["tensorflow"] == "2.15.1"
    assert summary["versions"]["horovod"] == "0.28.1"
    epochs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    # Sharded eval covers the 40 validation images exactly once across the two ranks.
    assert [r["val_count"] for r in epochs] == [40, 40, 40]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert summary["top1"] == epochs[-1]["val_top1"]
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [30, 60, 90]
    # LARS trust ratios of the adapted (rank > 1) variables, every log_every steps.
    ratios = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "trust_ratio"]
    assert [r["step"] for r in ratios] == [30, 60, 90]
    assert all(r["count"] == 5 and 0 < r["min"] <= r["median"] <= r["max"] for r in ratios)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert {k: latest[k] for k in ("name", "step", "epoch", "batch", "global_batch", "world_size")} == \
        {"name": "step-00000090", "step": 90, "epoch": 3, "batch": 0, "global_batch": 16, "world_size": 2}
    assert latest["config_hash"] == summary["config_hash"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == \
        ["step-00000030", "step-00000060", "step-00000090"]
    assert (run / "checkpoints" / "step-00000090" / "ckpt.index").exists()
    # Only rank 0 prints: one header line, three epoch lines.
    assert proc.stdout.count("knl-train: 2 ranks (mpi)") == 1
    epoch_lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch ")]
    assert [l.split()[1] for l in epoch_lines] == ["1/3", "2/3", "3/3"]
