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
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union

from knl_train.atomic import append_jsonl, write_json_atomic

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"


class _Record:
    kind: ClassVar[str] = ""

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object: ``kind`` first where there is one, unset optional fields left out."""
        out = {"kind": self.kind} if self.kind else {}
        out.update({k: v for k, v in dataclasses.asdict(self).items()
                    if v is not None or k in _ALWAYS.get(type(self).__name__, ())})
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        """The record in ``data``; keys it does not know (a newer writer's) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class StepRecord(_Record):
    """Training progress at one optimizer step: running epoch means averaged over ranks."""
    kind: ClassVar[str] = "step"
    step: int
    images_per_sec: float
    epoch: Optional[int] = None
    loss: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    lr: Optional[float] = None
    step_seconds: Optional[float] = None
    images_per_sec_per_rank: Optional[float] = None


@dataclass(frozen=True)
class EpochRecord(_Record):
    """One epoch: its training means, its validation (when evaluated) and its throughput."""
    kind: ClassVar[str] = "epoch"
    epoch: int
    step: int
    loss: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    skipped_images: Optional[int] = None
    lr: Optional[float] = None
    epoch_seconds: Optional[float] = None
    images_per_sec: Optional[float] = None
    images_per_sec_per_rank: Optional[float] = None
    val_loss: Optional[float] = None
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    val_count: Optional[int] = None


@dataclass(frozen=True)
class TrustRatioRecord(_Record):
    """The spread of LARS's per-layer trust ratios at one step."""
    kind: ClassVar[str] = "trust_ratio"
    step: int
    batch: Optional[int] = None
    count: Optional[int] = None
    min: Optional[float] = None
    median: Optional[float] = None
    max: Optional[float] = None
    argmin: Optional[str] = None
    argmax: Optional[str] = None


@dataclass(frozen=True)
class RunSummary(_Record):
    """What a finished run reports: accuracy, throughput (epochs after the first), its shape."""
    top1: Optional[float] = None
    top5: Optional[float] = None
    val_loss: Optional[float] = None
    train_loss: Optional[float] = None
    train_top1: Optional[float] = None
    images_per_sec: Optional[float] = None
    images_per_sec_per_rank: Optional[float] = None
    world_size: Optional[int] = None
    controller: Optional[str] = None
    global_batch: Optional[int] = None
    per_rank_batch: Optional[int] = None
    backward_passes_per_step: Optional[int] = None
    epochs: Optional[int] = None
    steps: Optional[int] = None
    num_classes: Optional[int] = None
    resumed_from_step: Optional[int] = None
    model: Optional[str] = None
    optimizer: Optional[str] = None
    precision: Optional[str] = None
    horovod: Optional[Dict[str, Any]] = None
    intra_op_threads: Optional[int] = None
    inter_op_threads: Optional[int] = None
    wall_seconds: Optional[float] = None
    config_hash: Optional[str] = None
    versions: Optional[Dict[str, Any]] = None


# Fields written even when None: a summary says "no validation" or "not resumed" explicitly.
_ALWAYS = {"RunSummary": tuple(f.name for f in dataclasses.fields(RunSummary))}
METRIC_KINDS = {c.kind: c for c in (StepRecord, EpochRecord, TrustRatioRecord)}
MetricRecord = Union[StepRecord, EpochRecord, TrustRatioRecord]


def append(path, record: MetricRecord) -> None:
    """Add one line to ``metrics.jsonl``."""
    append_jsonl(path, record.to_dict())


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


def read_metrics(path, name: Optional[str] = None,
                 kinds: Optional[Sequence[str]] = None) -> List[MetricRecord]:
    """Every known record of ``metrics.jsonl`` in order; ``ValueError`` names a bad line.

    Lines of an unknown kind, or of a kind not in ``kinds`` (if given), are skipped. A step
    record must carry an integer ``step`` and a positive ``images_per_sec``, since throughput is
    measured from them.
    """
    name = name or str(path)
    out: List[MetricRecord] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{name} line {n} is not JSON") from None
            if not isinstance(data, dict):
                raise ValueError(f"{name} line {n} is not a JSON object")
            cls = METRIC_KINDS.get(data.get("kind"))
            if cls is None or (kinds is not None and cls.kind not in kinds):
                continue
            if cls is StepRecord and not (is_integer(data.get("step")) and is_number(data.get("images_per_sec"))
                                          and data["images_per_sec"] > 0):
                raise ValueError(f"{name} line {n}: a step record needs an integer 'step' and a "
                                 "positive 'images_per_sec'")
            try:
                out.append(cls.from_dict(data))
            except TypeError:  # a required field is missing
                raise ValueError(f"{name} line {n}: a {cls.kind} record needs "
                                 f"{', '.join(_required(cls))}") from None
    return out


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _required(cls) -> List[str]:
    return [f"'{f.name}'" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
