"""The trainer's position (knl_train/train/control.py): updates, micro-batches, the next batch."""

from __future__ import annotations

from knl_train.train.control import Position


def test_position_counts_updates_and_states_the_next_batch():
    pos = Position(updates_per_epoch=30, passes=2, total_updates=45, epoch=1, batch=0, end_batch=30)
    assert (pos.micro_per_epoch, pos.update, pos.at_update_boundary) == (60, 30, True)
    pos.batch = 7
    assert (pos.update, pos.at_update_boundary, pos.state()) == (33, False, {"epoch": 1, "batch": 7})
    pos.batch = 30
    assert pos.finished and pos.epoch_ended and not pos.epoch_complete
    pos = Position(updates_per_epoch=30, passes=1, total_updates=90, epoch=0, batch=30)
    assert pos.state() == {"epoch": 1, "batch": 0}  # an epoch's end is the next one's start


def test_entering_an_epoch_keeps_a_resumed_position_and_ends_where_the_run_does():
    pos = Position(updates_per_epoch=30, passes=2, total_updates=75, epoch=1, batch=14)
    pos.enter(1)  # the epoch the checkpoint left: its batch stays
    assert (pos.epoch, pos.batch, pos.end_batch) == (1, 14, 60)
    pos.batch = 60
    pos.enter(2)  # the next one starts at its first batch and ends with the run, half-way
    assert (pos.epoch, pos.batch, pos.end_batch, pos.update) == (2, 0, 30, 60)
