"""The package's one logger: ``knl-train: [warning: ]message`` lines, from rank 0 only.

Every rank of a job runs the same code, so a message said by all of them is said N times: records
from ranks other than 0 are dropped unless logged with ``extra=EVERY_RANK`` (then they name their
rank). Warnings and errors carry their level; ``extra=STDOUT`` sends a line to standard output
(a run's progress, which is the command's output rather than a diagnostic).

An error only one rank can see (its shard of the data, its binding) is marked with ``this_rank``;
the command line then has that rank say it, naming itself even when it is rank 0 (``extra=
RANK_ERROR``). Each line leaves in one ``write`` call, so two ranks' lines, which the launcher
merges into one stream, cannot run together.
"""

from __future__ import annotations

import logging
import os
import sys

from knl_train.errors import UserError
from knl_train.runtime.rankenv import launcher_rank, launcher_size

ROOT = "knl_train"
EVERY_RANK = {"every_rank": True}
# An error this rank alone saw: said by it, naming it in any job of more than one rank.
RANK_ERROR = {"every_rank": True, "name_rank": True}
STDOUT = {"stdout": True}
# A progress line (a run's "epoch 3/5 ..."), to stdout as it is: scripts match its start.
PROGRESS = {"stdout": True, "bare": True}
# The prefix a line carries, by the logger's first name below ``knl_train``.
_PREFIXES = {"autotune": "tune", "autotune.trial": "trial"}
_MARK = "_knl_train_rank"


def this_rank(error: UserError) -> UserError:
    """Mark ``error`` as seen by this rank alone (its data, its binding), and return it: the
    rank says it, with its number, while the others stop quietly. Unmarked errors are every
    rank's (a config, an agreement of the ranks) and rank 0 says them."""
    setattr(error, _MARK, launcher_rank())
    return error


def seen_by_this_rank(error: BaseException) -> bool:
    return getattr(error, _MARK, None) is not None


def write_line(stream, line: str) -> None:
    """``line`` and a newline on ``stream`` in one ``write`` call on its file descriptor (a
    pipe takes up to 4 KiB whole), after whatever the stream holds buffered."""
    data = line if line.endswith("\n") else line + "\n"
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO (tests), a closed stream
        fd = None
    if fd is None:
        stream.write(data)
        stream.flush()
        return
    stream.flush()
    raw = data.encode(getattr(stream, "encoding", None) or "utf-8", "backslashreplace")
    while raw:
        raw = raw[os.write(fd, raw):]


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        # Looked up at each line: tests and the CLI swap sys.stdout and sys.stderr.
        stream = sys.stdout if getattr(record, "stdout", False) else sys.stderr
        try:
            write_line(stream, self.format(record))
        except (OSError, ValueError):  # a closed pipe must not turn a message into a crash
            pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "bare", False):
            return record.getMessage()
        name = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else ""
        prefix = _PREFIXES.get(name) or _PREFIXES.get(name.split(".")[0], "knl-train")
        rank = launcher_rank()
        named = rank or (getattr(record, "name_rank", False) and launcher_size() > 1)
        where = f" (rank {rank})" if named and getattr(record, "every_rank", False) else ""
        level = f"{record.levelname.lower()}{where}: " if record.levelno >= logging.WARNING else \
            (f"rank {rank}: " if where else "")
        return f"{prefix}: {level}{record.getMessage()}"


def _rank_zero(record: logging.LogRecord) -> bool:
    return getattr(record, "every_rank", False) or launcher_rank() == 0


def get(name: str) -> logging.Logger:
    """The logger for module ``name`` (``__name__``), set up on first use."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Handler) for h in root.handlers):
        handler = _Handler()
        handler.setFormatter(_Format())
        handler.addFilter(_rank_zero)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        # Our lines are written once, here; the application's own logging setup keeps its own.
        root.propagate = False
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
