"""Stop requests (knl_train/train/signals.py): the signal named is the first one, and the stop
line goes on launch's record under knl-train launch, to stdout without it."""

from __future__ import annotations

import os
import signal

from knl_train.runtime import outcome
from knl_train.runtime.rankenv import RankEnv
from knl_train.train.signals import StopRequest, announce_stop


def test_the_first_signal_is_the_one_named_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested and stop.name == ""
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's
        os.kill(os.getpid(), signal.SIGUSR1)  # a launcher passing a stop on
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_under_launch_rank_0_records_the_stop_and_prints_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RankEnv.var("outcome"), str(tmp_path))
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    announce_stop("SIGTERM", 40, "/r/checkpoints/step-00000040", is_root=True)
    assert outcome.read(tmp_path) == [{"rank": 0, "kind": "stopped", "signal": "SIGTERM", "step": 40,
                                       "checkpoint": "/r/checkpoints/step-00000040"}]
    assert capsys.readouterr() == ("", "")


def test_without_launch_rank_0_prints_the_line_naming_the_signal(monkeypatch, capsys):
    monkeypatch.delenv(RankEnv.var("outcome"), raising=False)
    announce_stop("SIGUSR1", 12, "/r/checkpoints/step-00000012", is_root=True)
    announce_stop("SIGUSR1", 12, "/r/checkpoints/step-00000012", is_root=False)
    assert capsys.readouterr().out == (
        "knl-train: stopped by SIGUSR1 at step 12: checkpoint /r/checkpoints/step-00000012 written; "
        "rerun the same command to resume from it\n")
