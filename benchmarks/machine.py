"""The machine a benchmark ran on, and writing its results (shared by the bench_* scripts)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from knl_train.errors import UserError
from knl_train.tuning import topology

ROOT = Path(__file__).resolve().parents[1]


def host() -> dict:
    """CPU model and counts, Python, the checkout's commit, and the date."""
    try:
        node = topology.detect()
    except UserError:  # no /proc/cpuinfo or sysfs (an unusual container): report what Python knows
        node = None
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+local changes"
    return {"cpu": node.model_name if node and node.model_name else platform.processor(),
            "logical_cpus": len(node.cpus) if node else os.cpu_count(),
            "cpus_available": len(node.affinity) if node else len(os.sched_getaffinity(0)),
            "threads_per_core": node.threads_per_core if node else None,
            "python": platform.python_version(), "git_commit": commit,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except OSError:
        return ""


def load_note(load_before, cpus: int):
    """A note for the results when the machine was busy before the run, else None."""
    if load_before[0] <= 0.5:
        return None
    return (f"the machine was not idle (1-min load average {load_before[0]:.1f} on {cpus} CPUs "
            "before the run): indicative numbers only")


def write_results(json_path: Path, md_path: Path, record: dict, markdown: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md_path.write_text(markdown)
