"""Where a rank's wall clock goes (knl_train/train/clock.py): start-up phases, then steps,
evaluation and checkpoints, adding up to the wall clock."""

from __future__ import annotations

import time

import pytest

from knl_train.train.clock import PHASES, Timeline


def _busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_parts_add_up_to_the_wall_clock_and_name_what_they_measure():
    t = Timeline(process_start=time.time() - 1.0)  # the process began a second ago
    for phase in PHASES[:-1]:
        t.mark(phase)
    assert t.startup()["imports"] >= 1.0 and not t.started
    t.steps_begin()
    t.step_end()                       # the first step ends start-up
    assert t.started and list(t.startup()) == list(PHASES)
    _busy(0.05)
    t.step_end()                       # a step: training
    with t.spent("checkpoint"):        # a timed checkpoint mid-epoch is not training
        _busy(0.05)
    _busy(0.02)
    t.step_end()
    t.steps_end()
    with t.spent("eval"):
        _busy(0.03)
    _busy(0.02)                        # the epoch boundary: other
    a = t.account(images_trained=640, steady_images_per_sec=10000.0)
    parts = a.startup_seconds + a.train_seconds + a.eval_seconds + a.checkpoint_seconds + a.other_seconds
    assert parts == pytest.approx(a.wall_seconds, abs=1e-9)
    assert 0.07 <= a.train_seconds < 0.07 + 0.03
    assert a.checkpoint_seconds >= 0.05 and a.eval_seconds >= 0.03 and a.other_seconds >= 0.02
    assert a.startup_seconds >= 1.0
    assert a.wall_images_per_sec == pytest.approx(640 / a.wall_seconds)
    assert a.time_to_train_efficiency == pytest.approx(640 / 10000.0 / a.wall_seconds)
    assert a.text().startswith(f"wall clock {a.wall_seconds:.1f} s: start-up")


def test_a_phase_is_marked_once_and_must_be_known():
    t = Timeline()
    t.mark("imports")
    first = t.marks["imports"]
    t.mark("imports")
    assert t.marks["imports"] == first
    with pytest.raises(ValueError, match="unknown start-up phase 'compile'"):
        t.mark("compile")


def test_without_a_steady_rate_there_is_no_efficiency():
    assert Timeline().account(0, None).time_to_train_efficiency is None


def test_only_the_processs_first_clock_starts_with_the_process():
    from knl_train.train import clock
    clock.Timeline._first = True
    first = Timeline()
    later = Timeline()  # a second run in the same process (a notebook, a script that trains twice)
    assert first.start < later.start and time.monotonic() - later.start < 1.0
