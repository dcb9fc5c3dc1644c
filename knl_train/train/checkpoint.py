"""Rank-0 checkpoints, written atomically and rotated.

Each checkpoint is a directory ``epoch-NNNN`` holding a ``tf.train.Checkpoint`` of the model and
optimizer. It is written under a temporary name and renamed into place, and ``latest.json`` is
replaced atomically afterwards, so a crash mid-write leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import tensorflow as tf

from knl_train.errors import UserError
from knl_train.io import write_json_atomic

LATEST = "latest.json"


class CheckpointManager:
    def __init__(self, directory, model, optimizer, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self._ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)

    def save(self, epoch: int, step: int) -> Path:
        name = f"epoch-{epoch:04d}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            self._ckpt.write(str(tmp / "ckpt"))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            write_json_atomic(self.directory / LATEST, {"name": name, "epoch": epoch, "step": step})
        except (OSError, tf.errors.OpError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            raise UserError(
                f"could not write checkpoint {final}: {getattr(e, 'message', e)}. "
                f"The previous checkpoint ({previous or 'none'}) is intact; "
                "free space or fix the permissions of the run directory.") from None
        self._rotate(epoch)
        return final

    def latest(self) -> Optional[Path]:
        try:
            info = json.loads((self.directory / LATEST).read_text())
        except (OSError, ValueError):
            return None
        return self.directory / info["name"]

    def restore(self, path) -> None:
        self._ckpt.read(str(Path(path) / "ckpt")).assert_existing_objects_matched()

    def _rotate(self, current: int):
        """Keep the last ``keep`` checkpoints up to ``current``.

        Checkpoints of later epochs belong to an earlier run in this directory that the current
        one has superseded (it started over); they would otherwise outlive it.
        """
        def epoch_of(p):
            return int(p.name.split("-", 1)[1])
        done = sorted((p for p in self.directory.glob("epoch-*") if p.is_dir()), key=epoch_of)
        stale = [p for p in done if epoch_of(p) > current]
        kept = [p for p in done if epoch_of(p) <= current]
        for old in stale + kept[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
