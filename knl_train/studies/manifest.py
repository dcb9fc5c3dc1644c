"""A study directory's ``manifest.json``: the ``Manifest``, a ``PointRecord`` per point, and each
point's ``JobRecord``.

Read checked (:meth:`Manifest.load`), written atomically (:meth:`Manifest.save`), changed under
a lock (:func:`locked`). The records are frozen: a change makes a new record
(:meth:`JobRecord.updated`, :meth:`Manifest.with_job`), which is then saved whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from knl_train.atomic import write_json_atomic
from knl_train.errors import UserError
from knl_train.records import is_integer, is_number

NAME = "manifest.json"
VERSION = 1
KINDS = ("scaling", "convergence")
# Fields only a convergence study sets: left out of a scaling study's JSON.
CONVERGENCE_POINT = frozenset({"optimizer", "lr", "repeat", "accumulation"})
CONVERGENCE_STUDY = frozenset({"target_top1", "reference_batch", "epochs"})


def now() -> str:
    """The time a record is made: UTC, ISO 8601, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JobRecord:
    """A point's job, as submit and status last saw it.

    The JSON holds the fields that were set, even to None (``"error": null``: the last
    submission raised none), and leaves out those never set; ``recorded`` names them, in the
    order they were first set, so a manifest reads back to the JSON it was.
    """
    id: Optional[str] = None
    # rendered, submitting, submitted, submit-failed, or a scheduler state (schedulers.STATES)
    state: Optional[str] = None
    error: Optional[str] = None       # why the last submission failed (its first line)
    submitted: Optional[str] = None   # when the scheduler took it (now())
    after: Optional[str] = None       # the job it waits for (chain: true)
    adopted: Optional[bool] = None    # found by name and token after an interrupted submit
    exit_code: Optional[int] = None
    checked: Optional[str] = None     # when status last changed its state
    retries: Optional[int] = None     # jobs submitted again by `study submit --retry-failed`
    earlier: Optional[Tuple[str, ...]] = None  # the ids of the jobs those retries replaced
    recorded: Tuple[str, ...] = ()
    # Keys this knl-train does not know (a newer one's, a user's): kept, and written back.
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def new(cls) -> "JobRecord":
        """A rendered point's job: not submitted."""
        return cls(id=None, state="rendered", recorded=("id", "state"))

    def updated(self, **changes) -> "JobRecord":
        added = tuple(k for k in changes if k not in self.recorded)
        return dataclasses.replace(self, **changes, recorded=self.recorded + added)

    def retried(self) -> "JobRecord":
        """The record of a new job for a point whose job ended badly: its id kept in ``earlier``."""
        earlier = (*(self.earlier or ()), *((self.id,) if self.id else ()))
        fresh = JobRecord.new().updated(retries=(self.retries or 0) + 1, earlier=earlier)
        return dataclasses.replace(fresh, extra=self.extra)

    def to_dict(self) -> Dict[str, Any]:
        return {**self.extra, **{k: _plain(getattr(self, k)) for k in self.recorded}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobRecord":
        known = tuple(k for k in data if k in _JOB_FIELDS)
        fields = {k: tuple(data[k]) if isinstance(data[k], list) else data[k] for k in known}
        return cls(**fields, recorded=known,
                   extra={k: v for k, v in data.items() if k not in _JOB_FIELDS})


_JOB_FIELDS = frozenset(f.name for f in dataclasses.fields(JobRecord)) - {"recorded", "extra"}


# Fields a rendering always has carry an empty default (``Manifest.load`` checks they are there):
# keyword arguments then stay in the JSON's order on every Python this supports (kw_only is 3.10+).
@dataclass(frozen=True)
class PointRecord:
    """One point as rendered: its shape, its files (relative to the study directory), its job."""
    id: str = ""
    nodes: int = 0
    ranks_per_node: Optional[int] = None
    ranks: int = 0
    cores_per_rank: Optional[int] = None
    cpus_per_task: Optional[int] = None
    global_batch: int = 0
    per_rank_batch: Optional[int] = None
    steps: Optional[int] = None
    epochs: Optional[int] = None
    walltime: Optional[str] = None
    queue: Optional[str] = None
    constraints: Tuple[str, ...] = ()
    job_name: Optional[str] = None
    script: Optional[str] = None           # points/<id>/job.sbatch or job.pbs
    run_dirs: Tuple[str, ...] = ()         # one per repeat: points/<id>/run-<r>
    token: Optional[str] = None            # in the job's comment: finds it again after a crash
    job: Optional[JobRecord] = None        # None: none recorded (a manifest not made by render)
    # A convergence study's point: its optimizer's label, peak LR at the reference batch, repeat
    # and micro-batches accumulated per update (absent from a scaling study's points).
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    repeat: Optional[int] = None
    accumulation: Optional[int] = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)  # keys we do not know: kept

    def to_dict(self) -> Dict[str, Any]:
        out = {**self.extra, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                                if f.name not in ("job", "extra")
                                and not (f.name in CONVERGENCE_POINT and getattr(self, f.name) is None)}}
        if self.job is not None:
            out["job"] = self.job.to_dict()
        return out


@dataclass(frozen=True)
class Manifest:
    """What was rendered (the study, where, how) and each point's record."""
    version: int = VERSION
    study: str = ""
    uid: Optional[str] = None              # in every point's token
    scheduler: Optional[str] = None
    site: Optional[str] = None
    launcher: Optional[str] = None
    preset: Optional[str] = None
    preset_ref: Optional[str] = None       # a built-in preset's name or a preset file's path
    scaling: Optional[str] = ""             # weak or strong; None for a convergence study
    repeats: Optional[int] = None
    array: bool = False
    chain: bool = False
    warmup_steps: int = 0
    images_per_epoch: float = 0.0
    project_epochs: float = 0.0
    memory_mode: Optional[str] = None
    spec_path: Optional[str] = None
    created: Optional[str] = None
    knl_train: Optional[str] = None        # the version that rendered it
    notes: Tuple[str, ...] = ()
    points: Tuple[PointRecord, ...] = ()
    kind: str = "scaling"                  # absent from manifests of scaling studies
    # A convergence study: the accuracy its report times, the batch its LRs are given at,
    # and every point's epochs.
    target_top1: Optional[float] = None
    reference_batch: Optional[int] = None
    epochs: Optional[int] = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)  # keys we do not know: kept

    @classmethod
    def new(cls, **fields) -> "Manifest":
        """A fresh rendering's manifest: this version, created now."""
        return cls(version=VERSION, created=now(), **fields)

    def point(self, point_id: str) -> PointRecord:
        for p in self.points:
            if p.id == point_id:
                return p
        raise KeyError(f"no point {point_id!r} in study {self.study}")

    def with_job(self, point_id: str, job: JobRecord) -> "Manifest":
        """This manifest with point ``point_id``'s job replaced."""
        points = tuple(dataclasses.replace(p, job=job) if p.id == point_id else p for p in self.points)
        return dataclasses.replace(self, points=points)

    def to_dict(self) -> Dict[str, Any]:
        out = {**self.extra, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                                if f.name not in ("points", "extra")
                                and not (f.name in CONVERGENCE_STUDY and getattr(self, f.name) is None)
                                and not (f.name == "kind" and self.kind == "scaling")}}
        out["points"] = [p.to_dict() for p in self.points]
        return out

    def save(self, study_dir) -> None:
        write_json_atomic(Path(study_dir) / NAME, self.to_dict())

    @classmethod
    def load(cls, study_dir) -> "Manifest":
        """The manifest, checked for the fields every study command relies on."""
        path = Path(study_dir) / NAME
        if not path.is_file():
            raise UserError(f"{path} not found: {study_dir} is not a study directory; create one "
                            f"with `knl-train study render SPEC --out {study_dir}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is damaged ({e}); render the study again with "
                            "`knl-train study render`") from None
        _check(path, data)
        _check_types(path, "", cls, data)
        fields = _known(cls, data, path, ("notes",))
        points = tuple(_point(path, p) for p in data["points"])
        return cls(**{**fields, "points": points})


def _check(path: Path, data) -> None:
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; render the study again")
    if data.get("version") != VERSION:
        raise UserError(f"{path} has version {data.get('version')!r}; this knl-train reads version {VERSION}")
    for key in ("study", "scaling", "images_per_epoch", "project_epochs", "warmup_steps", "points"):
        if key not in data:
            raise UserError(f"{path} has no '{key}'; render the study again")
    for key, ok in (("images_per_epoch", is_number(data["images_per_epoch"]) and data["images_per_epoch"] > 0),
                    ("project_epochs", is_number(data["project_epochs"]) and data["project_epochs"] > 0),
                    ("warmup_steps", is_integer(data["warmup_steps"]) and data["warmup_steps"] >= 0),
                    ("points", isinstance(data["points"], list))):
        if not ok:
            raise UserError(f"{path}: invalid '{key}': {data[key]!r}")
    kind = data.get("kind", "scaling")
    if kind not in KINDS:
        raise UserError(f"{path}: kind is {kind!r}, not one of {', '.join(KINDS)}")
    if kind == "scaling" and data["scaling"] not in ("weak", "strong"):
        raise UserError(f"{path}: scaling is {data['scaling']!r}, not 'weak' or 'strong'")
    if kind == "convergence":
        target = data.get("target_top1")
        if target is not None and not (is_number(target) and 0 < target <= 1):
            raise UserError(f"{path}: invalid 'target_top1': {target!r}")


def _point(path: Path, data) -> PointRecord:
    if not isinstance(data, dict):
        raise UserError(f"{path}: a point is not a JSON object ({data!r}); render the study again")
    for key in ("id", "nodes", "ranks", "global_batch", "run_dirs"):
        if key not in data:
            raise UserError(f"{path}: point {data.get('id', '?')} has no '{key}'; render the study again")
    where = f"point {data['id']}: " if isinstance(data["id"], str) else "a point's "
    _check_types(path, where, PointRecord, data)
    fields = _known(PointRecord, data, path, ("constraints", "run_dirs"))
    job = data.get("job")
    if job is not None and not isinstance(job, dict):
        raise UserError(f"{path}: point {data['id']}: invalid 'job': {job!r}")
    if job is not None:
        _check_types(path, f"point {data['id']}: job ", JobRecord, job)
    fields["job"] = None if job is None else JobRecord.from_dict(job)
    return PointRecord(**fields)


def _check_types(path: Path, where: str, cls, data: Mapping[str, Any]) -> None:
    """One line naming the first field of ``data`` whose value is not of its field's type."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints.get(key)
        if hint is None or key in ("points", "job", "extra", "recorded") or _typed(value, hint):
            continue
        raise UserError(f"{path}: {where}'{key}' is {json.dumps(value)[:60]}, not {_described(hint)}; "
                        "correct it or render the study again")


def _typed(value, hint) -> bool:
    """Whether a JSON value fits a field's type (JSON lists for tuples; no bools for numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_typed(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, list) and all(_typed(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is int:
        return is_integer(value)
    if hint is float:
        return is_number(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _described(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_described(a) for a in args)
    if origin is tuple:
        return f"a list of {_described(args[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, str(hint))


def _known(cls, data: dict, path: Path, lists: Tuple[str, ...]) -> Dict[str, Any]:
    """The fields of ``cls`` that ``data`` has, JSON lists as tuples; other keys go in ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"points", "job", "extra"}
    out = {k: v for k, v in data.items() if k in names}
    out["extra"] = {k: v for k, v in data.items() if k not in names and k not in ("points", "job")}
    for key in lists:
        if key in out:
            if not isinstance(out[key], list):
                raise UserError(f"{path}: invalid '{key}': {out[key]!r}")
            out[key] = tuple(out[key])
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


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
