"""The trainer on each data format, and on bad data, through the real command line."""

from __future__ import annotations

import json
import shutil

import pytest

from knl_train.data import tfrecord
from tests.support import KNL_TRAIN, read_jsonl, run_cli

COMMON = ["--set", "data.image_size=16", "--set", "per_rank_batch=8", "--set", "epochs=2",
          "--set", "log_every=100"]


@pytest.fixture(scope="module")
def tiny_tfrecords(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfrecords")
    tfrecord.to_tfrecord(tiny_dataset, out, shards=4, workers=1, progress=False)
    return out


@pytest.mark.slow
def test_tfrecords_on_two_ranks(launch, tiny_tfrecords, tmp_path):
    run = tmp_path / "run"
    proc = launch(KNL_TRAIN, "train", "--set", "data.format=tfrecord", "--set", f"data.path={tiny_tfrecords}",
                  "--set", f"run_dir={run}", *COMMON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_classes"] == 4
    assert summary["steps"] == 2 * (480 // 16)
    epochs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["val_count"] for r in epochs] == [40, 40]
    index = json.loads((run / "class_index.json").read_text())
    assert sorted(index.values()) == [0, 1, 2, 3] and list(index) == sorted(index)


def test_synthetic_data(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--set", "data.format=synthetic", "--set", "data.num_classes=10",
                   "--set", "data.num_examples=64", "--set", f"run_dir={run}", *COMMON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_classes"] == 10 and summary["steps"] == 2 * (64 // 8)
    assert "(synthetic)" in proc.stdout


@pytest.mark.slow
def test_corrupt_images_are_skipped_counted_and_reported(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    cls = sorted((data / "train").iterdir())[0]
    (cls / "zero.JPEG").write_bytes(b"")
    good = sorted(cls.glob("*.JPEG"))[1].read_bytes()
    (cls / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (cls / "garbage.JPEG").write_bytes(b"not a jpeg at all" * 10)
    run = tmp_path / "run"
    proc = run_cli("train", "--set", f"data.path={data}", "--set", f"run_dir={run}", *COMMON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epochs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert all(r["skipped_images"] >= 1 for r in epochs)
    assert sum(r["skipped_images"] for r in epochs) >= 3
    assert "unreadable images skipped in epoch 1" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_labels_out_of_range_stop_with_a_clear_error(tiny_tfrecords, tmp_path):
    # Offset 0 reads the stored 1-based labels as they are: label 4 is outside [0, 4).
    proc = run_cli("train", "--set", "data.format=tfrecord", "--set", f"data.path={tiny_tfrecords}",
                   "--set", "data.label_offset=0", "--set", f"run_dir={tmp_path / 'run'}", *COMMON)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "knl-train: error:" in proc.stderr and "label" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_every_image_unreadable_stops_two_ranks_with_one_line(launch, tiny_dataset, tmp_path):
    import time
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for f in (data / "train").glob("*/*.JPEG"):
        f.write_bytes(b"not an image")
    started = time.monotonic()
    proc = launch(KNL_TRAIN, "train", "--set", f"data.path={data}", "--set", f"run_dir={tmp_path / 'run'}",
                  *COMMON, timeout=240)
    seconds = time.monotonic() - started
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "none of the last 1000 training images" in line]
    assert lines, proc.stderr
    assert all(line.startswith("knl-train: error") and str(data / "train") in line for line in lines)
    assert "Traceback" not in proc.stderr
    assert seconds < 120, seconds  # start-up and 1000 failed reads, not a hang


@pytest.mark.slow
def test_jpegs_with_trailing_bytes_train_with_none_skipped(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for f in data.glob("*/*/*.JPEG"):
        f.write_bytes(f.read_bytes() + b"\x00" * 32 + b"camera trailer")
    run = tmp_path / "run"
    proc = run_cli("train", "--set", f"data.path={data}", "--set", f"run_dir={run}",
                   "--set", "data.image_size=16", "--set", "per_rank_batch=16", "--set", "epochs=1",
                   "--set", "log_every=100", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epochs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["skipped_images"] for r in epochs] == [0] and epochs[0]["val_count"] == 40
    assert "unreadable" not in proc.stdout + proc.stderr
