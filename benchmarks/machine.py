"""The machine a benchmark ran on, for its results file (shared by the bench_* scripts)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def host() -> dict:
    """CPU model and counts, Python, the checkout's commit, and the date."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
        threads_per_core = len(re.split(r"[,-]", siblings.strip()))
    except OSError:
        threads_per_core = None
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+local changes"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)), "threads_per_core": threads_per_core,
            "python": platform.python_version(), "git_commit": commit,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except OSError:
        return ""
