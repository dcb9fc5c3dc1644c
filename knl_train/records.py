"""A run's records: ``summary.json`` and the lines of ``metrics.jsonl``, defined once.

The trainer writes them (rank 0) and the study report reads them back, so both go through these
types: ``RunSummary``, and the metric lines ``StepRecord`` (every ``log_every`` steps),
``EpochRecord`` (every epoch) and ``TrustRatioRecord`` (LARS's trust ratios). A line's ``kind``
says which it is. Reading is strict where a report depends on a value and names the bad line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from knl_train.atomic import append_jsonl, write_json_atomic
from knl_train.errors import UserError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
# A rank whose busy step time exceeds the median over ranks by this factor is a straggler
# (EpochRecord.slow_ranks; the scaling report lists them).
SLOW_FACTOR = 1.10
SLOW_RANKS_KEPT = 64  # per epoch record, the slowest first


class _Record:
    kind: ClassVar[str] = ""
    # Fields a reader does without: a line or summary lacking them reads as None ("*": all).
    optional: ClassVar[Tuple[str, ...]] = ()
    # Write None fields too (a summary says "no validation" or "not resumed" explicitly).
    keep_none: ClassVar[bool] = False

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object: ``kind`` first where there is one, unset optional fields left out."""
        out = {"kind": self.kind} if self.kind else {}
        out.update({k: v for k, v in dataclasses.asdict(self).items()
                    if v is not None or self.keep_none})
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        """The record in ``data``; keys it does not know (a newer writer's) are ignored, and
        missing optional ones read as None (``TypeError`` if a required one is missing)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and not cls.is_optional(n)]
        if missing:
            raise TypeError(f"{cls.__name__} needs {', '.join(missing)}")
        return cls(**{n: data.get(n) for n in names})

    @classmethod
    def is_optional(cls, name: str) -> bool:
        return "*" in cls.optional or name in cls.optional

    @classmethod
    def check(cls, data: Dict[str, Any]) -> Optional[str]:
        """What a line needs and lacks for a reader to use it, or None."""
        return None


@dataclass(frozen=True)
class _Progress(_Record):
    """Where a run stands and how fast it goes: what step and epoch records share."""
    step: int
    epoch: int
    loss: float    # the epoch's running mean so far, averaged over ranks
    top1: float
    top5: float
    lr: float
    images_per_sec: float
    images_per_sec_per_rank: float


@dataclass(frozen=True)
class StepRecord(_Progress):
    """Training progress at one optimizer step (every ``log_every`` steps)."""
    kind: ClassVar[str] = "step"
    # Throughput is measured from step and images_per_sec; the rest may be absent.
    optional: ClassVar[Tuple[str, ...]] = ("epoch", "loss", "top1", "top5", "lr", "step_seconds",
                                           "images_per_sec_per_rank")
    step_seconds: float

    @classmethod
    def check(cls, data: Dict[str, Any]) -> Optional[str]:
        # Throughput is measured from these two.
        if is_integer(data.get("step")) and is_number(data.get("images_per_sec")) and data["images_per_sec"] > 0:
            return None
        return "a step record needs an integer 'step' and a positive 'images_per_sec'"


_STRAGGLER_FIELDS = ("busy_step_seconds_median", "busy_step_seconds_max", "busy_spread",
                     "slowest_rank", "slowest_host", "slow_ranks")


@dataclass(frozen=True)
class EpochRecord(_Progress):
    """One epoch: its training means, its validation (when evaluated) and its throughput."""
    kind: ClassVar[str] = "epoch"
    optional: ClassVar[Tuple[str, ...]] = ("loss", "top1", "top5", "lr", "images_per_sec",
                                           "images_per_sec_per_rank", "skipped_images",
                                           "epoch_seconds", "val_loss", "val_top1", "val_top5",
                                           "val_count", "eval_seconds", "checkpoint_seconds",
                                           "wall_seconds", *_STRAGGLER_FIELDS)
    skipped_images: int
    epoch_seconds: float                  # its training steps
    val_loss: Optional[float] = None      # the val_* fields: only after an evaluation
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    val_count: Optional[int] = None
    eval_seconds: Optional[float] = None        # its evaluation
    checkpoint_seconds: Optional[float] = None  # the training loop waiting on its checkpoint
    # The process's wall clock at this record: start-up and every epoch so far, this one's
    # evaluation included (time to accuracy is read from it).
    wall_seconds: Optional[float] = None
    # Stragglers (multi-rank runs): each rank's busy seconds per step over the epoch (its step
    # time less its wait in the gradient allreduce), gathered at the guard's agreements.
    busy_step_seconds_median: Optional[float] = None  # over ranks
    busy_step_seconds_max: Optional[float] = None
    busy_spread: Optional[float] = None               # max / median
    slowest_rank: Optional[int] = None
    slowest_host: Optional[str] = None
    # [rank, host, busy seconds per step] of ranks slower than the median by SLOW_FACTOR
    slow_ranks: Optional[List[list]] = None


@dataclass(frozen=True)
class TrustRatioRecord(_Record):
    """The spread of LARS's per-layer trust ratios at one step."""
    kind: ClassVar[str] = "trust_ratio"
    optional: ClassVar[Tuple[str, ...]] = ("batch", "count", "min", "median", "max", "argmin", "argmax")
    step: int
    batch: int
    count: int
    min: float
    median: float
    max: float
    argmin: str
    argmax: str


@dataclass(frozen=True)
class RunSummary(_Record):
    """What a finished run reports: accuracy, throughput (epochs after the first), its shape."""
    # Any field may be absent from a summary written by hand or by an older knl-train.
    optional: ClassVar[Tuple[str, ...]] = ("*",)
    keep_none: ClassVar[bool] = True
    top1: Optional[float]            # the last evaluation's; None if none ran
    top5: Optional[float]
    val_loss: Optional[float]
    train_loss: float
    train_top1: float
    images_per_sec: float
    images_per_sec_per_rank: float
    world_size: int
    controller: str
    global_batch: int
    per_rank_batch: int
    backward_passes_per_step: int
    epochs: int
    steps: int
    num_classes: int
    resumed_from_step: Optional[int]
    model: str
    optimizer: str
    precision: str
    horovod: Dict[str, Any]
    intra_op_threads: int
    inter_op_threads: int
    wall_seconds: float              # this rank's process start to the summary
    config_hash: str
    versions: Dict[str, Any]
    # Where the wall clock went: the five parts add up to wall_seconds.
    startup_seconds: Optional[float] = None     # process start to the end of the first step
    train_seconds: Optional[float] = None       # training steps after the first
    eval_seconds: Optional[float] = None        # evaluations
    checkpoint_seconds: Optional[float] = None  # the training loop waiting on checkpoints
    other_seconds: Optional[float] = None       # the rest: epoch boundaries, metrics, shutdown
    startup: Optional[Dict[str, float]] = None  # startup_seconds by phase
    images_trained: Optional[int] = None        # by this process (a resumed run: since resuming)
    epochs_trained: Optional[float] = None      # images_trained / images per epoch
    evaluations: Optional[int] = None
    checkpoints: Optional[int] = None
    wall_images_per_sec: Optional[float] = None       # images_trained / wall_seconds
    time_to_train_efficiency: Optional[float] = None  # images_trained / images_per_sec / wall


METRIC_KINDS = {c.kind: c for c in (StepRecord, EpochRecord, TrustRatioRecord)}
MetricRecord = Union[StepRecord, EpochRecord, TrustRatioRecord]


def append(path, record: MetricRecord) -> None:
    """Add one line to ``metrics.jsonl``; ``UserError`` naming the file and the OS's reason if
    it cannot be written (a full disk, a file system turned read-only)."""
    try:
        append_jsonl(path, record.to_dict())
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; free space or fix the run "
                        "directory's permissions, then rerun to resume from the last checkpoint") from None


def write_summary(path, summary: RunSummary) -> None:
    write_json_atomic(path, summary.to_dict())


def read_summary(path) -> RunSummary:
    """``summary.json``; ``ValueError`` if it is not a JSON object (``OSError`` if unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"is damaged: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    return RunSummary.from_dict(data)


def read_metrics(path, name: Optional[str] = None, kinds: Optional[Sequence[str]] = None, *,
                 cut_short_ok: bool = False) -> List[MetricRecord]:
    """Every known record of ``metrics.jsonl`` in order; ``ValueError`` names a bad line.

    Lines of an unknown kind, or of a kind not in ``kinds`` (if given), are skipped. A step
    record must carry an integer ``step`` and a positive ``images_per_sec``, since throughput is
    measured from them. With ``cut_short_ok``, a last line that is not JSON and has no newline
    (its write was interrupted) is left out.
    """
    name = name or str(path)
    out: List[MetricRecord] = []
    for n, _, data in json_lines(path, name, cut_short_ok=cut_short_ok):
        cls = METRIC_KINDS.get(data.get("kind"))
        if cls is None or (kinds is not None and cls.kind not in kinds):
            continue
        problem = cls.check(data)
        if problem:
            raise ValueError(f"{name} line {n}: {problem}")
        try:
            out.append(cls.from_dict(data))
        except TypeError:  # a required field is missing
            raise ValueError(f"{name} line {n}: a {cls.kind} record needs "
                             f"{', '.join(_required(cls))}") from None
    return out


def json_lines(path, name: Optional[str] = None, *, cut_short_ok: bool = False,
               on_cut_short: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[int, str, dict]]:
    """(line number, line, object) for each non-blank line of a JSON-lines file; ``ValueError``
    names a line that is not a JSON object. With ``cut_short_ok``, a last line that is not JSON
    and has no newline (its write was interrupted) is left out, and ``on_cut_short`` told its
    number."""
    name = name or str(path)
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                if cut_short_ok and not line.endswith("\n"):  # only the last line lacks one
                    if on_cut_short is not None:
                        on_cut_short(n)
                    return
                raise ValueError(f"{name} line {n} is not JSON") from None
            if not isinstance(data, dict):
                raise ValueError(f"{name} line {n} is not a JSON object")
            yield n, line, data


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _required(cls) -> List[str]:
    return [f"'{f.name}'" for f in dataclasses.fields(cls) if not cls.is_optional(f.name)]
