"""A study directory's ``manifest.json``: read checked, written atomically, changed under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from pathlib import Path

from knl_train.errors import UserError
from knl_train.atomic import write_json_atomic

NAME = "manifest.json"


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load(study_dir) -> dict:
    """The manifest, checked for the fields every study command relies on."""
    path = Path(study_dir) / NAME
    if not path.is_file():
        raise UserError(f"{path} not found: {study_dir} is not a study directory; create one "
                        f"with `knl-train study render SPEC --out {study_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); render the study again with "
                        "`knl-train study render`") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a JSON object; render the study again")
    if manifest.get("version") != 1:
        raise UserError(f"{path} has version {manifest.get('version')!r}; this knl-train reads version 1")
    for key in ("study", "scaling", "images_per_epoch", "project_epochs", "warmup_steps", "points"):
        if key not in manifest:
            raise UserError(f"{path} has no '{key}'; render the study again")
    for key, ok in (("images_per_epoch", number(manifest["images_per_epoch"]) and manifest["images_per_epoch"] > 0),
                    ("project_epochs", number(manifest["project_epochs"]) and manifest["project_epochs"] > 0),
                    ("warmup_steps", integer(manifest["warmup_steps"]) and manifest["warmup_steps"] >= 0),
                    ("points", isinstance(manifest["points"], list))):
        if not ok:
            raise UserError(f"{path}: invalid '{key}': {manifest[key]!r}")
    if manifest["scaling"] not in ("weak", "strong"):
        raise UserError(f"{path}: scaling is {manifest['scaling']!r}, not 'weak' or 'strong'")
    for p in manifest["points"]:
        for key in ("id", "nodes", "ranks", "global_batch", "run_dirs"):
            if key not in p:
                raise UserError(f"{path}: point {p.get('id', '?')} has no '{key}'; render the study again")
    return manifest


def save(study_dir, manifest: dict) -> None:
    write_json_atomic(Path(study_dir) / NAME, manifest)


@contextlib.contextmanager
def locked(study_dir):
    """Exclusive use of the study directory: two submits at once could submit a point twice."""
    path = Path(study_dir) / ".lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another knl-train study command is changing {study_dir}; "
                            "wait for it to finish and run this again") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
