"""The ``knl-train`` console script, run for real in a subprocess: versions and error messages."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.support import run_cli as _run_cli

# The default environment: KNL_TRAIN_ITEX=1 in the caller's shell would load ITEX, which logs.
ENV = {k: v for k, v in os.environ.items() if k != "KNL_TRAIN_ITEX"}


def run_cli(*args, **kwargs):
    return _run_cli(*args, env=ENV, **kwargs)


def _errors(proc):
    """The non-empty stderr lines."""
    return [line for line in proc.stderr.splitlines() if line.strip()]


def _assert_user_error(proc, *needles):
    """Exit 2, exactly one 'knl-train: error:' line on stderr naming every needle, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = _errors(proc)
    assert len(lines) == 1, out
    assert lines[0].startswith("knl-train: error: "), out
    for needle in needles:
        assert needle in lines[0], (needle, out)
    return lines[0]


def test_version_names_the_pinned_stack():
    proc = run_cli("version", check=True)
    rows = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    assert rows["TensorFlow"] == "2.15.1"
    assert re.fullmatch(r"2\.15\.\d+", rows["Keras"]), rows["Keras"]
    assert rows["Horovod"].startswith("0.28.1 ")
    controllers = re.search(r"controllers: ([^;]*);", rows["Horovod"]).group(1).split(", ")
    assert "MPI" in controllers and "Gloo" in controllers
    assert rows["MPI"] and rows["MPI"] != "not found"
    assert "MPI" in rows["MPI"]  # e.g. "Open MPI v4.1.4, ..."
    assert re.fullmatch(r"3\.\d+\.\d+", rows["Python"]), rows["Python"]
    assert "Traceback" not in proc.stderr


def test_version_json_has_the_same_facts():
    proc = run_cli("version", "--json", check=True)
    info = json.loads(proc.stdout)
    for key in ("python", "tensorflow", "keras", "horovod", "horovod_controllers", "mpi", "knl_train"):
        assert key in info, key
    assert info["tensorflow"] == "2.15.1"
    assert info["keras"].startswith("2.15.")
    assert info["horovod"] == "0.28.1"
    assert {"MPI", "Gloo"} <= set(info["horovod_controllers"])
    assert "MPI" in info["mpi"]
    assert info["python"].startswith("3.")


@pytest.mark.parametrize("args, needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["version", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["data", "make-demo", "--out", "x", "--classes", "many"], "invalid int value: 'many'"),
])
def test_bad_command_line_exits_2_with_argparse_usage(args, needle):
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("usage: knl-train"), proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_train_with_missing_dataset_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nonexistent"
    proc = run_cli("train", "--set", f"data.path={missing}", "--set", f"run_dir={tmp_path / 'run'}",
                   timeout=120)
    line = _assert_user_error(proc, str(missing), "does not exist")
    assert "make-demo" in line  # says how to get a dataset
    assert not (tmp_path / "run").exists()


def test_unknown_config_field_is_named_with_the_allowed_fields():
    proc = run_cli("train", "--set", "optimizer.momentom=0.9", timeout=60)
    line = _assert_user_error(proc, "optimizer.momentom")
    allowed = line.split("allowed in optimizer:")[1]
    assert {"momentum", "weight_decay", "variant", "nesterov"} <= {f.strip() for f in allowed.split(",")}


def test_bad_literal_names_the_allowed_values():
    proc = run_cli("train", "--set", "optimizer.variant=bogus", timeout=60)
    _assert_user_error(proc, "optimizer.variant", "'bogus'", "you", "tf_contrib", "model_garden")


def test_train_with_missing_config_file(tmp_path):
    proc = run_cli("train", "--config", tmp_path / "nope.yaml", timeout=60)
    _assert_user_error(proc, str(tmp_path / "nope.yaml"), "does not exist")


@pytest.mark.parametrize("args", [["launch", "-np", "2", "--"], ["launch", "-np", "2"]])
def test_launch_without_a_command_says_to_put_it_after_dashes(args):
    proc = run_cli(*args, timeout=60)
    _assert_user_error(proc, "nothing to launch", "'--'")
    assert proc.stdout == ""


def test_make_demo_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    proc = run_cli("data", "make-demo", "--out", target, "--quiet", timeout=60)
    _assert_user_error(proc, str(target), "not a knl-train demo dataset")
    assert target.read_text() == "keep me"


def test_launch_with_zero_ranks():
    proc = run_cli("launch", "-np", "0", "--", "echo", "hi", timeout=60)
    _assert_user_error(proc, "-np must be >= 1", "got 0")
    assert "hi" not in proc.stdout


@pytest.mark.parametrize("args, needles", [
    (["--classes", "1"], ["--classes", "between 2 and 40", "got 1"]),
    (["--size", "8"], ["--size", "between 16 and 512", "got 8"]),
    (["--train-per-class", "0"], ["--train-per-class", ">= 1", "got 0"]),
])
def test_make_demo_bad_arguments(tmp_path, args, needles):
    out = tmp_path / "demo"
    proc = run_cli("data", "make-demo", "--out", out, "--quiet", *args, timeout=60)
    _assert_user_error(proc, *needles)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_make_demo_writes_then_is_a_no_op(tmp_path):
    out = tmp_path / "demo"
    args = ("data", "make-demo", "--out", out, "--classes", "2", "--train-per-class", "2",
            "--val-per-class", "1", "--size", "16", "--quiet")
    first = run_cli(*args, timeout=60, check=True)
    assert f"wrote 2 classes x (2 train + 1 val) JPEG images of 16 px to {out}" in first.stdout
    assert len(list(out.glob("train/*/*.JPEG"))) == 4
    second = run_cli(*args, timeout=60, check=True)
    assert "already holds this dataset; nothing to do" in second.stdout
