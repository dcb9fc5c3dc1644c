"""``knl-train tune`` options (knl_train/cli/tune.py): each bad value is named, before any trial runs."""

from __future__ import annotations

import argparse

import pytest

from knl_train.cli import tune as tune_cli
from knl_train.errors import UserError
from tests.support import run_cli


@pytest.mark.parametrize("argv, message", [
    (["--onednn", "maybe"], "--onednn: 'maybe' is not on or off"),
    (["--ranks", "1,0"], "--ranks: 0 is too small"),
    (["--inter-op", "1,,2"], "--inter-op '1,,2'"),
    (["--precision", "fp16"], "--precision: unknown precision 'fp16'"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--model", "resnet5O"], "--model 'resnet5O' is not in the registry"),
])
def test_bad_option_values_are_named(argv, message):
    p = argparse.ArgumentParser()
    tune_cli.add_arguments(p)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        tune_cli.main(p.parse_args(argv + ["--dry-run"]))


def test_tune_is_wired_and_refuses_a_bad_option():
    p = run_cli("tune", "--precision", "fp16", "--dry-run")
    assert p.returncode == 2 and "fp16" in p.stderr and "Traceback" not in p.stderr
