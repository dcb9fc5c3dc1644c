"""The package's shipped data, found the same way in a checkout and in an installed wheel.

``jobs/`` (templates, sites, studies, training configs) is a link to the top-level folder in a
checkout and package data in a wheel; presets and recipes live beside their modules.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(package: str, *parts: str) -> Path:
    """A file or folder shipped in ``package`` (e.g. ``path("knl_train.optim", "recipes.yaml")``)."""
    return Path(str(resources.files(package).joinpath(*parts)))


def jobs_dir(kind: str = "") -> Path:
    """``jobs/`` or one of its subfolders (templates, sites, studies, train)."""
    root = path("knl_train", "jobs")
    return root / kind if kind else root
