"""Rank-0 checkpoints, written atomically and rotated.

Each checkpoint is a directory ``step-NNNNNNNN`` (optimizer updates done) holding a
``tf.train.Checkpoint`` of the model and optimizer (weights, slots, iteration count) and
``state.json``: where in the data the run stands. It is written under a temporary name and
renamed into place, and ``latest.json`` is replaced atomically afterwards, so a crash mid-write
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import tensorflow as tf

from knl_train.errors import UserError
from knl_train.atomic import write_json_atomic

LATEST = "latest.json"
STATE = "state.json"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def latest_state(directory) -> Optional[dict]:
    """The state of the newest complete checkpoint in ``directory``, or None."""
    try:
        state = json.loads((Path(directory) / LATEST).read_text())
    except (OSError, ValueError):
        return None
    if not (Path(directory) / state.get("name", "") / "ckpt.index").exists():
        return None
    return state


class CheckpointManager:
    def __init__(self, directory, model, optimizer, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self._ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)

    def save(self, step: int, state: Optional[dict] = None) -> Path:
        """Write the checkpoint of update ``step``; ``state`` (JSON) is stored beside it."""
        name = checkpoint_name(step)
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        state = {"name": name, "step": step, **(state or {})}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            self._ckpt.write(str(tmp / "ckpt"))
            write_json_atomic(tmp / STATE, state)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            write_json_atomic(self.directory / LATEST, state)
        except (OSError, tf.errors.OpError) as e:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            raise UserError(
                f"could not write checkpoint {final}: {getattr(e, 'message', None) or e}. "
                f"The previous checkpoint ({previous or 'none'}) is intact; "
                "free space or fix the permissions of the run directory, then rerun to resume.") from None
        self._rotate(step)
        return final

    def latest(self) -> Optional[Path]:
        state = latest_state(self.directory)
        return self.directory / state["name"] if state else None

    def restore(self, path) -> None:
        self._ckpt.read(str(Path(path) / "ckpt")).assert_existing_objects_matched()

    def _rotate(self, current: int):
        """Keep the last ``keep`` checkpoints up to ``current``.

        Checkpoints of later steps belong to an earlier run in this directory that the current
        one has superseded (it started over); they would otherwise outlive it.
        """
        def step_of(p):
            return int(p.name[len(PREFIX):])
        done = sorted((p for p in self.directory.glob(PREFIX + "*") if p.is_dir()), key=step_of)
        stale = [p for p in done if step_of(p) > current]
        kept = [p for p in done if step_of(p) <= current]
        for old in stale + kept[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
