"""The study spec's fields (YAML keys) as frozen dataclasses, each checked on its own.

What a field means together with the site, the preset and the training config (queues, the
node plan, batches per point) is checked when :func:`.spec.expand` builds the points.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple

from knl_train import yamlconfig
from knl_train.studies import sites as site_profiles

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k (ILSVRC-2012) training set


@dataclass(frozen=True)
class TrainRef:
    """The training config: a YAML file (relative to the spec) plus ``--set``-style overrides."""
    config: Optional[str] = None
    set: Dict[str, Any] = field(default_factory=dict)


# Settings a convergence study sets per point: neither its training config nor an optimizer's
# overrides may set them, since they would be silently replaced.
PER_POINT = ("global_batch", "per_rank_batch", "epochs", "steps", "horovod.backward_passes_per_step",
             "schedule.peak_lr", "schedule.reference_batch")
LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(-[A-Za-z0-9_]+)*$")


@dataclass(frozen=True)
class OptimizerTrial:
    """A convergence study's optimizer: its training overrides and the peak LRs to try (each at
    the reference batch; a point's schedule rescales it by the overrides' ``schedule.scaling``)."""
    lr: Tuple[float, ...]
    set: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.lr:
            raise ValueError("lr: give at least one peak learning rate")
        if any(not math.isfinite(v) or v <= 0 for v in self.lr):
            raise ValueError(f"lr: every learning rate must be a number > 0, got {list(self.lr)}")
        if len({f"{v:g}" for v in self.lr}) != len(self.lr):  # as point ids write them
            raise ValueError(f"lr: {list(self.lr)} repeats a value (to 6 significant digits)")
        if not isinstance(self.set, dict):
            raise ValueError("set must be a mapping of dotted config keys to values")


@dataclass(frozen=True)
class StudySpec:
    name: str
    site: str
    # Node counts, e.g. [1, 2, 4, 8] or {start: 1, factor: 2, max: 2048}; a convergence study
    # runs on one count (nodes: 4).
    nodes: Tuple[int, ...]
    scaling: Optional[Literal["weak", "strong"]] = None
    kind: Literal["scaling", "convergence"] = "scaling"
    train: TrainRef = field(default_factory=TrainRef)
    # A preset name or file; None: the site's. A preset for another CPU than the site's node is
    # an error unless allowed here (the plan then lays the preset's rules onto that node).
    preset: Optional[str] = None
    allow_preset_mismatch: bool = False
    # 0: the preset's for the site's node.
    ranks_per_node: int = 0
    cores_per_rank: int = 0
    # Weak scaling fixes the batch per rank, strong scaling the global batch; None: the
    # training config's.
    per_rank_batch: Optional[int] = None
    global_batch: Optional[int] = None
    # Per point and repeat: optimizer steps, or epochs; None: the training config's.
    steps: Optional[int] = None
    epochs: Optional[int] = None
    # Steps left out of the throughput (graph building, first allreduces).
    warmup_steps: int = 2
    repeats: int = 1
    # Per point: HH:MM:SS, or a formula in minutes over nodes, ranks, ranks_per_node, steps,
    # epochs, global_batch, per_rank_batch, repeats (e.g. "10 + repeats * steps * 0.05").
    walltime: str = "00:30:00"
    account: Optional[str] = None
    queue: Optional[str] = None
    qos: Optional[str] = None
    # None: the site's constraints (and its memory mode's).
    constraints: Optional[Tuple[str, ...]] = None
    memory_mode: Optional[Literal["cache", "flat"]] = None
    # chain: each point waits for the one before (afterany); array: a point's repeats run as
    # a job array instead of one after another in one job.
    chain: bool = False
    array: bool = False
    # The report's projection: epochs of this many images.
    images_per_epoch: int = IMAGENET_TRAIN_IMAGES
    project_epochs: int = 90
    # Metrics every this many steps (throughput is measured from them).
    # None: 1 in a scaling study, the training config's in a convergence study.
    log_every: Optional[int] = None
    # A directory of templates that take precedence over the shipped ones.
    templates: Optional[str] = None
    # kind: convergence. The global batches to compare, the optimizers (label -> overrides and
    # peak LRs), the batch the LRs are given at (None: the smallest), and the validation top-1
    # whose epochs and wall time to reach the report gives.
    global_batches: Tuple[int, ...] = ()
    optimizers: Dict[str, OptimizerTrial] = field(default_factory=dict)
    reference_batch: Optional[int] = None
    target_top1: Optional[float] = None

    def __post_init__(self):
        if not self.name.strip() or len(self.name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in self.name):
            raise ValueError("name must be 1-200 printable characters on one line")
        if not self.nodes:
            raise ValueError("nodes: give at least one node count")
        if any(n < 1 for n in self.nodes):
            raise ValueError(f"nodes must be >= 1, got {list(self.nodes)}")
        if list(self.nodes) != sorted(set(self.nodes)):
            raise ValueError(f"nodes must be increasing, without repeats, got {list(self.nodes)}")
        yamlconfig.in_range(self, "ranks_per_node", "cores_per_rank", minimum=0, hint="0: the preset's")
        if not isinstance(self.train.set, dict):
            raise ValueError("train.set must be a mapping of dotted config keys to values")
        if self.kind == "convergence":
            _check_convergence(self)
        else:
            self._check_scaling()
        yamlconfig.at_least(self, 1, "per_rank_batch", "global_batch", "steps", "epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set steps or epochs per point, not both")
        if self.scaling == "weak" and self.global_batch is not None:
            raise ValueError("weak scaling fixes the batch per rank: set per_rank_batch, not global_batch")
        if self.scaling == "strong" and self.per_rank_batch is not None:
            raise ValueError("strong scaling fixes the global batch: set global_batch, not per_rank_batch")
        yamlconfig.at_least(self, 1, "repeats", "images_per_epoch", "project_epochs", "log_every")
        yamlconfig.at_least(self, 0, "warmup_steps")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps}): "
                             "no step would be measured")
        if self.array and self.repeats < 2:
            raise ValueError("array: true needs repeats >= 2 (a job array of one task is a plain job)")
        for name in ("account", "queue", "qos"):
            if getattr(self, name) is not None:
                site_profiles.safe_value(name, getattr(self, name))
        for c in self.constraints or ():
            site_profiles.safe_value("constraints", c)

    def _check_scaling(self):
        if self.scaling is None:
            raise ValueError("scaling is required: weak or strong (or set kind: convergence)")
        for name in ("global_batches", "optimizers", "reference_batch", "target_top1"):
            if getattr(self, name) not in (None, (), {}):
                raise ValueError(f"{name} belongs to a convergence study: set kind: convergence, "
                                 f"or remove {name}")


def _check_convergence(spec: StudySpec) -> None:
    """What a convergence study needs, each error naming its field."""
    def must(ok: bool, message: str):
        if not ok:
            raise ValueError(message)
    must(spec.scaling is None, "scaling: a convergence study compares batches on fixed nodes; remove scaling")
    must(len(spec.nodes) == 1, f"nodes: a convergence study runs on one node count, got {list(spec.nodes)}")
    must(spec.global_batch is None, "global_batch: a convergence study takes global_batches: [...]")
    must(spec.steps is None, "steps: a convergence study compares batches at one epoch budget: set epochs")
    must(not spec.array, "array: each repeat of a convergence study is a point of its own; remove array")
    must(bool(spec.global_batches), "global_batches: give the global batches to compare, e.g. [256, 1024, 4096]")
    must(all(b >= 1 for b in spec.global_batches),
         f"global_batches must be >= 1, got {list(spec.global_batches)}")
    must(list(spec.global_batches) == sorted(set(spec.global_batches)),
         f"global_batches must be increasing, without repeats, got {list(spec.global_batches)}")
    must(bool(spec.optimizers), "optimizers: give at least one, e.g. {lars: {set: {optimizer.name: lars}, lr: [2, 4]}}")
    for label, trial in spec.optimizers.items():
        must(isinstance(label, str) and bool(LABEL.match(label)) and len(label) <= 40,
             f"optimizers: label {label!r} must be a letter then letters, digits, _ or single - "
             "(at most 40): it names directories and jobs")
        for key in trial.set:
            must(key not in PER_POINT, f"optimizers.{label}.set: {key} is set per point by the study "
                                       f"(lr: and global_batches:); remove it")
    for key in spec.train.set:
        must(key not in PER_POINT, f"train.set: {key} is set per point by the study; remove it")
    must(spec.reference_batch is None or spec.reference_batch >= 1,
         f"reference_batch must be >= 1, got {spec.reference_batch}")
    must(spec.target_top1 is None or 0 < spec.target_top1 <= 1,
         f"target_top1 is a fraction of 1 (0.75 for 75 %), got {spec.target_top1}")
