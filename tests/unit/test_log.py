"""The package's lines (knl_train/log.py): who says an error, how it names its rank, and that each
line leaves in one write."""

from __future__ import annotations

import io
import os

import pytest

from knl_train import log as knl_log
from knl_train.errors import UserError
from knl_train.runtime.rankenv import RANK_VARS, SIZE_VARS

log = knl_log.get("tests.log")


class _Err:
    def __init__(self, capsys):
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def job(monkeypatch, capsys):
    """Be rank ``rank`` of ``size`` as Open MPI tells a rank; what reaches stderr, so far."""
    for var in (*RANK_VARS, *SIZE_VARS):
        monkeypatch.delenv(var, raising=False)
    err = _Err(capsys)

    def be(rank: int, size: int) -> _Err:
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", str(rank))
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(size))
        return err
    return be


def test_an_error_one_rank_saw_names_that_rank(job):
    err = job(1, 2)
    log.error("label 99 is outside [0, 4)", extra=knl_log.RANK_ERROR)
    assert err.getvalue() == "knl-train: error (rank 1): label 99 is outside [0, 4)\n"


def test_rank_zero_names_itself_only_in_a_job_of_several_ranks(job):
    err = job(0, 2)
    log.error("bad shard", extra=knl_log.RANK_ERROR)
    job(0, 1)
    log.error("bad shard", extra=knl_log.RANK_ERROR)
    assert err.getvalue() == "knl-train: error (rank 0): bad shard\nknl-train: error: bad shard\n"


def test_an_error_every_rank_shares_is_said_by_rank_zero_alone(job):
    err = job(1, 2)
    log.error("unknown model 'resnet5'")
    assert err.getvalue() == ""
    job(0, 2)
    log.error("unknown model 'resnet5'")
    assert err.getvalue() == "knl-train: error: unknown model 'resnet5'\n"


def test_every_rank_lines_keep_their_old_form_on_rank_zero(job):
    # The stall watchdog and bootstrap notes use EVERY_RANK: rank 0 stays unnumbered there.
    err = job(0, 2)
    log.error("ranks 1 stalled", extra=knl_log.EVERY_RANK)
    job(1, 2)
    log.warning("bound elsewhere", extra=knl_log.EVERY_RANK)
    assert err.getvalue() == ("knl-train: error: ranks 1 stalled\n"
                              "knl-train: warning (rank 1): bound elsewhere\n")


def test_this_rank_marks_the_error_and_returns_it(job):
    job(1, 2)
    e = UserError("x")
    assert not knl_log.seen_by_this_rank(e)
    assert knl_log.this_rank(e) is e and knl_log.seen_by_this_rank(e)
    assert not knl_log.seen_by_this_rank(ValueError("x"))


def test_a_line_leaves_in_one_write_call_on_the_descriptor(monkeypatch):
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")
    stream.write("buffered before ")  # flushed first, in its own write
    calls = []
    real_write = os.write

    def counting(fd, data):
        calls.append(bytes(data))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", counting)
    line = "knl-train: error (rank 1): " + "é" * 900  # 1,827 bytes: under a pipe's 4 KiB
    knl_log.write_line(stream, line)
    stream.close()
    got = b""
    while chunk := os.read(read_end, 65536):
        got += chunk
    os.close(read_end)
    assert got.decode() == "buffered before " + line + "\n"
    assert (line + "\n").encode() in calls  # the whole line, newline included, in one call
    assert all(c == b"buffered before " or c == (line + "\n").encode() for c in calls)


def test_a_stream_without_a_descriptor_gets_the_line_and_its_newline():
    out = io.StringIO()
    knl_log.write_line(out, "done")
    knl_log.write_line(out, "again\n")
    assert out.getvalue() == "done\nagain\n"
