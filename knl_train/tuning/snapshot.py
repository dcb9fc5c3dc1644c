"""Topology snapshots: the files ``topology.detect()`` reads, recorded on one node, planned on another.

A snapshot is ``{"name", "files": {relative path: text}, "lscpu"}`` (``knl-train topology
--record FILE``); it keeps exactly what the parsers read, trimmed of anything personal.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

from knl_train.atomic import write_json_atomic
from knl_train.errors import UserError
from knl_train.tuning.topology import RECORD_HINT, FsReader, Topology, first_processor, parse


class _SnapshotReader:
    def __init__(self, snapshot: dict):
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("files"), dict):
            raise UserError("not a topology snapshot: expected {'name': ..., 'files': {path: text}, 'lscpu': ...}; "
                            + RECORD_HINT)
        self.files: Dict[str, str] = snapshot["files"]
        self.name = snapshot.get("name") or "snapshot"
        self._lscpu = snapshot.get("lscpu")

    def read(self, rel: str) -> Optional[str]:
        return self.files.get(rel)

    def listdir(self, rel: str) -> List[str]:
        prefix = rel.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/", 1)[0] for p in self.files if p.startswith(prefix)})

    def lscpu(self) -> Optional[str]:
        return self._lscpu

    def where(self, rel: str) -> str:
        return f"{rel} in snapshot {self.name!r}"


class _RecordingReader:
    """Passes reads through and keeps what was found, trimmed to what the parsers use."""

    def __init__(self, inner: FsReader):
        self.inner = inner
        self.name = inner.name
        self.files: Dict[str, str] = {}

    def read(self, rel: str) -> Optional[str]:
        text = self.inner.read(rel)
        if text is not None:
            self.files[rel] = _trim(rel, text)
        return text

    def listdir(self, rel: str) -> List[str]:
        return self.inner.listdir(rel)

    def lscpu(self) -> Optional[str]:
        return self.inner.lscpu()

    def where(self, rel: str) -> str:
        return self.inner.where(rel)


def _lines_with(text: str, pattern: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if re.search(pattern, line))


def _trim(rel: str, text: str) -> str:
    """What a snapshot keeps of a file: the parts the parsers read, nothing personal."""
    if rel == "proc/cpuinfo":
        return first_processor(text)
    if rel == "proc/self/status":   # also holds uid/gid, memory use, signal masks...
        return _lines_with(text, r"^Cpus_allowed")
    if rel == "proc/self/cgroup":   # other controllers' paths name sessions and sandboxes
        return _lines_with(text, r"^0::|^\d+:([^:]*,)?cpuset(,[^:]*)?:")
    if rel == "proc/meminfo" or rel.endswith("/meminfo"):
        return _lines_with(text, r"MemTotal:")
    return text


def record(root: str = "/", name: str = "") -> dict:
    """A snapshot of exactly the files detect() reads (cpuinfo cut to its first processor)."""
    reader = _RecordingReader(FsReader(root))
    parse(reader, root)
    return {"name": name or os.uname().nodename, "files": dict(sorted(reader.files.items())),
            "lscpu": reader.lscpu()}


def write(path, root: str = "/", name: str = "") -> None:
    """``record()`` into a JSON file, atomically."""
    write_json_atomic(path, record(root, name))


def to_topology(snapshot: dict) -> Topology:
    """detect() over a snapshot's files, without writing them anywhere."""
    reader = _SnapshotReader(snapshot)
    return parse(reader, reader.name)


def load(path) -> Topology:
    """A snapshot JSON file (written from record()) -> Topology."""
    try:
        with open(path, encoding="utf-8") as f:
            snapshot = json.load(f)
    except FileNotFoundError:
        raise UserError(f"topology snapshot {path} does not exist; {RECORD_HINT}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read topology snapshot {path}: {e}; {RECORD_HINT}") from None
    return to_topology(snapshot)
