"""A point's job output: the file its scheduler wrote in the point directory, and what it says.

Each backend names it its own way: ``local-<id>.out`` (the local site), ``slurm-<id>.out`` or
``slurm-<array>_<task>.out`` (the Slurm template's ``--output``), and PBS's ``<name>.o<id>``
(``-j oe``: standard error in it too). A point submitted again has one per job: the newest is
the last job's. Its tail is enough: the error that ended a run is near the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# local-7.out, slurm-7.out, slurm-7_2.out; PBS's lb-mini-p3.o1234 and array subjobs' .o1234.2
NAME = re.compile(r"\.(out|o\d+(\.\d+)?)$")
# knl_train.log's error line, "(rank N)" when every rank said it; mpirun may prefix the line.
ERROR = re.compile(r"knl-train: error(?: \(rank \d+\))?: (.+)")
TAIL = 65536


@dataclass(frozen=True)
class JobOutput:
    """The newest job output file and its last ``TAIL`` bytes, decoded leniently."""
    path: Path
    tail: str

    @property
    def error(self) -> Optional[str]:
        """The message of the last ``knl-train: error:`` line, or None."""
        found = ERROR.findall(self.tail)
        return found[-1].strip() if found else None

    def says(self, text: str) -> bool:
        return text in self.tail


def newest(point_dir) -> Optional[Path]:
    """The most recently written job output file in ``point_dir`` (ties: the last name)."""
    try:
        found = [(f.stat().st_mtime, f.name, f) for f in Path(point_dir).iterdir()
                 if NAME.search(f.name) and f.is_file()]
    except OSError:   # no point directory yet, or a file gone while looking
        return None
    return max(found)[2] if found else None


def read(point_dir) -> Optional[JobOutput]:
    """The newest job output and its tail, or None if there is none (or it cannot be read)."""
    path = newest(point_dir)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - TAIL))
            return JobOutput(path, f.read().decode(errors="replace"))
    except OSError:
        return None
