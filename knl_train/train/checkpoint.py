"""Rank-0 checkpoints, written atomically and rotated, in the background or at once.

Each checkpoint is a directory ``step-NNNNNNNN`` (optimizer updates done) holding a
``tf.train.Checkpoint`` of the model and optimizer (weights, slots, iteration count) and
``state.json``: where in the data the run stands. It is written under a temporary name and
renamed into place, and ``latest.json`` is replaced atomically afterwards, so a crash mid-write
leaves the previous checkpoint as the latest. Resuming does not rely on ``latest.json``:
``newest_good`` scans the checkpoint directories and verifies each.

``save`` writes at once. ``begin`` only snapshots the variables on the calling thread (a read of
each: cheap, see ``_snapshot``) and writes the same files from the snapshot in a background
thread while training goes on; one write at most is in flight, and its failure is reported by
the next ``begin`` or ``wait``. The thread is not a daemon, so an interpreter that exits
normally finishes the write first; a process killed mid-write leaves a temporary directory
and the previous ``latest.json``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import tensorflow as tf

from knl_train.errors import UserError
from knl_train.atomic import write_json_atomic

LATEST = "latest.json"
STATE = "state.json"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def latest_state(directory) -> Optional[dict]:
    """The state of the newest good checkpoint in ``directory``, or None."""
    return newest_good(directory).state


@dataclass
class Choice:
    """The newest good checkpoint's state (None: no good one), and the newer ones passed over
    (name, problem), newest first."""
    state: Optional[dict]
    skipped: List[Tuple[str, str]]


def step_dirs(directory) -> List[Path]:
    """The checkpoint directories (``step-NNNNNNNN``), newest first; temporaries are not."""
    found = [p for p in Path(directory).glob(PREFIX + "*")
             if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def newest_good(directory) -> Choice:
    """Scans the checkpoint directories, newest first, until one passes ``problem``.

    ``latest.json`` is not consulted: a write cut off leaves it stale or torn, while each
    checkpoint carries its own state file."""
    skipped = []
    for path in step_dirs(directory):
        issue = problem(path)
        if issue is None:
            return Choice(json.loads((path / STATE).read_text()), skipped)
        skipped.append((path.name, issue))
    return Choice(None, skipped)


def problem(path: Path) -> Optional[str]:
    """What is wrong with the checkpoint directory ``path``, or None if it can be restored.

    The state file must parse and name this checkpoint. Every tensor is then read back: TF's
    reader checks each one's size and checksum against the index, so a missing or torn data
    shard, or a corrupt index, shows here rather than in the middle of a restore. It reads the
    whole checkpoint once (ResNet-50 with a momentum slot: about 200 MB), on rank 0 only, and
    only the newest checkpoints up to the first good one."""
    try:
        state = json.loads((path / STATE).read_text())
    except OSError as e:
        return f"no readable {STATE} ({e.strerror or e})"
    except ValueError:
        return f"{STATE} is not complete JSON"
    if not isinstance(state, dict) or state.get("name") != path.name or \
            not isinstance(state.get("step"), int):
        return f"{STATE} does not describe {path.name}"
    if not (path / "ckpt.index").is_file():
        return "its index file ckpt.index is missing"
    try:
        reader = tf.train.load_checkpoint(str(path / "ckpt"))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001  the reader maps TF errors to IndexError, ValueError...
        message = str(getattr(e, "message", None) or e).strip().splitlines()
        return f"its TensorFlow data cannot be read ({message[0] if message else type(e).__name__})"
    return None


@dataclass
class _Write:
    """One checkpoint on its way to disk."""
    step: int
    state: dict
    final: Path
    tmp: Path
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


class _Shadows:
    """The saver's object map: each variable's snapshot copy, looked up by identity (variables
    are not hashable)."""

    def __init__(self, pairs):
        self._by_id = {id(v): (v, shadow) for v, shadow in pairs}

    def get(self, obj, default=None):
        hit = self._by_id.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else default


class CheckpointManager:
    """Writes, rotates and restores the checkpoints of one run directory (rank 0 only).

    ``last_written`` is the newest checkpoint this manager completed; ``blocked_seconds`` the
    time its callers spent in ``save``, ``begin`` and ``wait``.
    """

    def __init__(self, directory, model, optimizer, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self.last_written: Optional[Path] = None
        self.blocked_seconds = 0.0
        self._optimizer = optimizer
        self._ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
        # Background writes go through a second Checkpoint over the same objects whose saver
        # reads the snapshot copies instead of the live variables. Its object map is the hook
        # TF's own async checkpoint uses (a private attribute): without it, write at once.
        self._writer = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self._can_shadow = hasattr(getattr(self._writer, "_saver", None), "_object_map")
        self._flight: Optional[_Write] = None

    # ---- writing -----------------------------------------------------------------------------
    def save(self, step: int, state: Optional[dict] = None) -> Path:
        """Write the checkpoint of update ``step`` now; ``state`` (JSON) is stored beside it.

        A write still in flight is finished first (and its failure raised)."""
        self.wait()
        start = time.monotonic()
        try:
            job = self._job(step, state)
            self._write(job, self._ckpt)
            return job.final
        finally:
            self.blocked_seconds += time.monotonic() - start

    def begin(self, step: int, state: Optional[dict] = None) -> None:
        """Snapshot the checkpoint of update ``step`` and write it in the background.

        The previous write is finished first: at most one is in flight, and if it failed, its
        error is raised here and nothing new is written. ``wait`` ends this one."""
        self.wait()
        start = time.monotonic()
        try:
            job = self._job(step, state)
            if not self._can_shadow:
                self._run(job, None)  # at once; wait() reports the outcome as usual
            else:
                threading.Thread(target=self._run, args=(job, self._snapshot()), daemon=False,
                                 name=f"knl-train-checkpoint-{step}").start()
            self._flight = job
        finally:
            self.blocked_seconds += time.monotonic() - start

    def wait(self) -> Optional[Path]:
        """Finish the write in flight: its checkpoint's path, or None if there was none.

        Raises the write's error (once): the UserError ``save`` would have raised."""
        job = self._flight
        if job is None:
            return None
        start = time.monotonic()
        job.done.wait()
        self.blocked_seconds += time.monotonic() - start
        self._flight = None  # only now: a wait cut short by a signal leaves the write in flight
        if job.error is not None:
            raise job.error
        return job.final

    @property
    def in_flight(self) -> bool:
        """A background write is running (its outcome is collected by ``wait`` or ``begin``)."""
        return self._flight is not None and not self._flight.done.is_set()

    def _job(self, step: int, state: Optional[dict]) -> _Write:
        name = checkpoint_name(step)
        # A copy: the caller may change its dict while the write is in flight.
        state = copy.deepcopy({"name": name, "step": step, **(state or {})})
        return _Write(step, state, final=self.directory / name, tmp=self.directory / f".{name}.tmp")

    def _snapshot(self) -> List[Tuple[tf.Variable, tf.Tensor]]:
        """Every saved variable with its value now.

        On the CPU a read shares the variable's buffer, and TF's in-place updates (the
        ResourceApply* kernels, assign_add, the fused LARS op) copy a buffer that a reader still
        holds before writing it (copy-on-write): the read is a snapshot that copies nothing
        here; the first update of each variable while the write holds it pays for one copy."""
        found = {}
        for obj in tf.train.TrackableView(self._ckpt).descendants():
            if isinstance(obj, tf.Variable):
                found[id(obj)] = obj
        # Slots of the Keras 2 (legacy) optimizers hang off the optimizer, not the object tree.
        slots = self._optimizer.variables
        for v in (slots() if callable(slots) else slots):
            found.setdefault(id(v), v)
        snapshot = []
        for v in found.values():
            try:
                snapshot.append((v, tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype)))
            except tf.errors.FailedPreconditionError:
                pass  # uninitialized: the saver skips it too
        return snapshot

    def _run(self, job: _Write, snapshot) -> None:
        """The background half (or all of it, ``snapshot`` None): write, record the outcome."""
        try:
            if snapshot is None:
                self._write(job, self._ckpt)
            else:
                with tf.device("CPU:0"):
                    shadows = _Shadows((v, tf.Variable(value, trainable=False, name=_plain_name(v)))
                                       for v, value in snapshot)
                self._writer._saver._object_map = shadows  # pylint: disable=protected-access
                try:
                    self._write(job, self._writer)
                finally:
                    self._writer._saver._object_map = None  # frees the copies
        except BaseException as e:  # handed to the caller by wait(): never lost with the thread
            job.error = e
        finally:
            job.done.set()

    def _write(self, job: _Write, ckpt: tf.train.Checkpoint) -> None:
        """Write ``ckpt`` as ``job``'s checkpoint, atomically; point latest.json at it; rotate."""
        final, tmp = job.final, job.tmp
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            ckpt.write(str(tmp / "ckpt"))
            write_json_atomic(tmp / STATE, job.state)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            write_json_atomic(self.directory / LATEST, job.state)
        except (OSError, tf.errors.OpError) as e:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            raise UserError(
                f"could not write checkpoint {final}: {getattr(e, 'message', None) or e}. "
                f"The previous checkpoint ({previous or 'none'}) is intact; "
                "free space or fix the permissions of the run directory, then rerun to resume.") from None
        self.last_written = final
        self._rotate(job.step)

    # ---- reading -----------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        state = latest_state(self.directory)
        return self.directory / state["name"] if state else None

    def restore(self, path) -> None:
        """Load checkpoint ``path`` into the model and optimizer; ``UserError`` if it does not
        fit them (another model, number of classes or optimizer wrote it)."""
        self.wait()
        try:
            self._ckpt.read(str(Path(path) / "ckpt")).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as e:  # shapes, missing slots
            first = (str(getattr(e, "message", None) or e).strip().splitlines() or [type(e).__name__])[0][:240]
            _drop_quietly(e)
            raise UserError(
                f"checkpoint {path} does not fit this run's model and optimizer ({first}); it was "
                f"written for another model, number of classes or optimizer: use another run_dir, "
                "or --fresh to discard its checkpoints") from None

    def _rotate(self, current: int):
        """Keep the last ``keep`` checkpoints up to ``current``.

        Checkpoints of later steps belong to an earlier run in this directory that the current
        one has superseded (it started over); they would otherwise outlive it.
        """
        def step_of(p):
            return int(p.name[len(PREFIX):])
        done = step_dirs(self.directory)[::-1]
        stale = [p for p in done if step_of(p) > current]
        kept = [p for p in done if step_of(p) <= current]
        for old in stale + kept[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _drop_quietly(error: BaseException) -> None:
    """After a failed restore, TF warns of each unrestored value when the model goes (at exit,
    after the run's one error line): those warnings are dropped."""
    def keep(record) -> bool:
        text = record.getMessage()
        return not (text.startswith("Detecting that an object or model or tf.train.Checkpoint is being "
                                    "deleted with unrestored values")
                    or text.startswith("Value in checkpoint could not be found in the restored object"))
    tf.get_logger().addFilter(keep)
    error.__traceback__ = None


def _plain_name(v: tf.Variable) -> str:
    """``v``'s name without the ``:0``: the copy's name, which the checkpoint records."""
    return v.name.partition(":")[0]
