"""For the local scheduler's tests (tests/unit/studies/test_localqueue.py, test_localrunner.py and
schedulers/test_local.py): job scripts that name themselves, and a poll with a deadline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional


def job_script(directory: Path, body: str, name: str = "pt", token: str = "tok-1",
               limit: Optional[str] = None) -> Path:
    """``directory/job.sh``: ``#LOCAL`` lines for its name, token and (given) time limit, then ``body``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "job.sh"
    time_line = f"#LOCAL --time={limit}\n" if limit else ""
    path.write_text(f"#!/bin/bash\n#LOCAL --job-name={name}\n#LOCAL --comment={token}\n{time_line}{body}\n")
    return path


def until(predicate, timeout: float = 60.0):
    """Poll ``predicate`` until it holds (its value), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.05)


def quiet(line: str) -> None:
    """An ``echo`` for a runner whose log the test does not read."""
