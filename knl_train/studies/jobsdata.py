"""Where the shipped job data lives: ``jobs/`` (templates, sites, studies), installed as package data.

In a checkout ``knl_train/jobs`` is a link to the top-level ``jobs/``; a wheel carries the files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def directory(kind: str = "") -> Path:
    """``jobs/`` or one of its subdirectories (templates, sites, studies, train)."""
    root = Path(str(resources.files("knl_train") / "jobs"))
    return root / kind if kind else root
