"""A study point's projected time to train: per-repeat costs, their medians, the hours."""

from __future__ import annotations

import pytest

from knl_train.records import RunSummary
from knl_train.studies import projection

ACCOUNT = {"startup_seconds": 6.0, "eval_seconds": 3.0, "checkpoint_seconds": 1.2,
           "evaluations": 3, "checkpoints": 2}


def summary(**fields) -> RunSummary:
    return RunSummary.from_dict({"images_per_sec": 100.0, "world_size": 2, "global_batch": 64,
                                 **fields})


def run_dir(tmp_path, text="eval:\n  every_epochs: 1\ncheckpoint:\n  every_epochs: 1\n"):
    if text is not None:
        (tmp_path / "config.yaml").write_text(text)
    return tmp_path


def test_events_every_kth_epoch_and_the_last():
    assert [projection.events(90, k) for k in (1, 2, 4, 89, 90, 1000)] == [90, 45, 23, 2, 1, 1]


def test_costs_per_evaluation_times_the_cadence(tmp_path):
    costs = projection.repeat_costs(summary(**ACCOUNT), run_dir(tmp_path), 90)
    assert costs == {"startup_seconds": 6.0,
                     "eval_seconds_each": 1.0, "eval_every_epochs": 1,
                     "eval_seconds_per_epoch": 1.0,
                     "checkpoint_seconds_each": 0.6, "checkpoint_every_epochs": 1,
                     "checkpoint_seconds_per_epoch": pytest.approx(0.6)}
    # Every 4th epoch: 23 evaluations in 90 epochs (the last one too); checkpoints every 2nd: 45.
    costs = projection.repeat_costs(summary(**ACCOUNT), run_dir(
        tmp_path, "eval: {every_epochs: 4}\ncheckpoint: {every_epochs: 2}\n"), 90)
    assert costs["eval_seconds_per_epoch"] == pytest.approx(1.0 * 23 / 90)
    assert costs["checkpoint_seconds_per_epoch"] == pytest.approx(0.6 * 45 / 90)


def test_keys_left_out_of_config_are_the_trainers_defaults(tmp_path):
    costs = projection.repeat_costs(summary(**ACCOUNT), run_dir(tmp_path, "model: small_cnn\n"), 90)
    assert (costs["eval_every_epochs"], costs["checkpoint_every_epochs"]) == (1, 1)


def test_no_evaluation_done_costs_nothing(tmp_path):
    # No validation set (synthetic data): no evaluation in the run, none in the projection.
    costs = projection.repeat_costs(summary(**{**ACCOUNT, "eval_seconds": 0.0, "evaluations": 0}),
                                    run_dir(tmp_path), 90)
    assert (costs["eval_seconds_each"], costs["eval_seconds_per_epoch"]) == (0.0, 0.0)


@pytest.mark.parametrize("fields, config, why", [
    ({}, "eval: {}\n", "summary.json has no time account (an older knl-train)"),
    ({**ACCOUNT, "checkpoints": None}, "eval: {}\n", "summary.json has no checkpoints"),
    ({**ACCOUNT, "eval_seconds": -1.0, "evaluations": 1.5}, "eval: {}\n",
     "summary.json: invalid eval_seconds, evaluations"),
    (ACCOUNT, None, "no config.yaml (the run's evaluation and checkpoint cadence)"),
    (ACCOUNT, "eval: [1\n", "config.yaml is damaged: while parsing a flow sequence"),
    (ACCOUNT, "- 1\n", "config.yaml is not a mapping"),
    (ACCOUNT, "checkpoint: {every_epochs: 0}\n",
     "config.yaml: checkpoint.every_epochs is not a positive integer"),
])
def test_unknown_costs_say_why(tmp_path, fields, config, why):
    assert projection.repeat_costs(summary(**fields), run_dir(tmp_path, config), 90) == {
        "costs_unknown": why}


def test_point_costs_are_medians_only_when_every_repeat_has_them():
    a = {"status": "ok", "eval_seconds_per_epoch": 1.0, "checkpoint_seconds_per_epoch": 0.2,
         "startup_seconds": 5.0}
    b = {**a, "eval_seconds_per_epoch": 3.0, "startup_seconds": 7.0}
    failed = {"status": "missing", "reason": "no summary.json"}
    assert projection.point_costs([a, b, failed]) == {
        "eval_seconds_per_epoch": 2.0, "checkpoint_seconds_per_epoch": 0.2, "startup_seconds": 6.0}
    old = {"status": "ok", "costs_unknown": "summary.json has no time account"}
    assert projection.point_costs([a, old]) == dict.fromkeys(projection.COSTS)
    assert projection.point_costs([failed]) == dict.fromkeys(projection.COSTS)


def test_hours():
    costs = {"eval_seconds_per_epoch": 2.0, "checkpoint_seconds_per_epoch": 0.5,
             "startup_seconds": 36.0}
    assert projection.hours(90, 100.0, costs) == pytest.approx((36 + 90 * 102.5) / 3600)
    assert projection.hours(90, 100.0, dict.fromkeys(projection.COSTS)) == 2.5
