"""The study spec (YAML): what to scale, where, and how; validated and expanded into points.

Everything a job script needs is worked out here, before anything is written: the node plan
from the tuning preset, batch sizes per point, the queue that fits, the walltime.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml

from knl_train import yamlconfig
from knl_train.errors import UserError
from knl_train.studies import sites as site_profiles, walltime
from knl_train.studies.sites import Site
from knl_train.train import config as train_config
from knl_train.train.config import TrainConfig
from knl_train.tuning import plan as tuning_plan, preset as presets, snapshot, topology
from knl_train.tuning.plan import NodePlan

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k (ILSVRC-2012) training set


@dataclass(frozen=True)
class TrainRef:
    """The training config: a YAML file (relative to the spec) plus ``--set``-style overrides."""
    config: Optional[str] = None
    set: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    name: str
    site: str
    # Node counts, e.g. [1, 2, 4, 8] or {start: 1, factor: 2, max: 2048}.
    nodes: Tuple[int, ...]
    scaling: Literal["weak", "strong"]
    train: TrainRef = field(default_factory=TrainRef)
    # A preset name or file; None: the site's.
    preset: Optional[str] = None
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
    log_every: int = 1
    # A directory of templates that take precedence over the shipped ones.
    templates: Optional[str] = None

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
        if not isinstance(self.train.set, dict):
            raise ValueError("train.set must be a mapping of dotted config keys to values")


@dataclass(frozen=True)
class Point:
    """One node count of the study: one job script."""
    id: str
    nodes: int
    ranks_per_node: int
    ranks: int
    cores_per_rank: int
    cpus_per_task: int
    global_batch: int
    per_rank_batch: int
    steps: Optional[int]
    epochs: Optional[int]
    walltime: str
    queue: Optional[str]
    constraints: Tuple[str, ...]
    job_name: str

    @property
    def directory(self) -> str:
        return f"points/{self.id}"


@dataclass(frozen=True)
class Study:
    """A validated spec with everything derived from it."""
    spec: StudySpec
    site: Site
    spec_path: Path
    preset_ref: str              # a built-in name or a preset file's absolute path
    node: NodePlan               # for the site's node
    train_config: TrainConfig    # the base, before per-point values
    points: Tuple[Point, ...]
    memory_mode: Optional[str]
    notes: Tuple[str, ...] = ()


# ---- loading ---------------------------------------------------------------------------------------
def load(path, *, templates: Optional[str] = None) -> Study:
    """Read and validate a study spec; every error names the field and says what to do.

    ``templates``: a directory of templates that takes precedence over the spec's own.
    """
    path = Path(path)
    data = yamlconfig.load_yaml(path)
    if isinstance(data.get("nodes"), dict):
        data["nodes"] = _geometric(data["nodes"])
    if isinstance(data.get("constraints"), str):
        data["constraints"] = [c for c in data["constraints"].split(",") if c]
    for key in ("name", "site", "nodes", "scaling"):
        if key not in data:
            raise UserError(f"study {path}: {key!r} is required (see jobs/studies/ for examples)")
    try:
        spec = yamlconfig.from_dict(StudySpec, data)
    except UserError as e:
        raise UserError(f"study {path}: {e}") from None
    if templates:
        spec = dataclasses.replace(spec, templates=os.path.abspath(templates))
    return expand(spec, path)


def _geometric(g: dict) -> List[int]:
    unknown = set(g) - {"start", "factor", "max"}
    if unknown or "max" not in g:
        raise UserError("nodes: a geometric series is {start: 1, factor: 2, max: 2048} "
                        f"(start and factor optional){'; unknown key ' + sorted(unknown)[0] if unknown else ''}")
    start, factor, top = g.get("start", 1), g.get("factor", 2), g["max"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, factor, top)) \
            or start < 1 or factor < 2 or top < start:
        raise UserError(f"nodes: need whole numbers start >= 1, factor >= 2, max >= start; got {g}")
    out, n = [], start
    while n <= top:
        out.append(n)
        n *= factor
    return out


def expand(spec: StudySpec, spec_path: Path) -> Study:
    base = spec_path.parent
    site = site_profiles.load(spec.site, base)
    mode = spec.memory_mode or site.memory_mode
    if spec.memory_mode and spec.memory_mode not in site.modes():
        raise UserError(f"memory_mode {spec.memory_mode}: site {site.name} offers "
                        f"{', '.join(site.modes()) or 'no KNL memory modes'}")
    preset_arg = spec.preset or site.preset
    preset_path = Path(preset_arg) if preset_arg.endswith((".yaml", ".yml")) else None
    if preset_path is not None and not preset_path.is_absolute():
        preset_path = (base / preset_path).resolve()
    topo = _topology(site, preset_arg if preset_path is None else str(preset_path), mode)
    node = tuning_plan.node_plan(preset_arg if preset_path is None else str(preset_path),
                                spec.ranks_per_node, cores_per_rank=spec.cores_per_rank, topology=topo)
    preset_ref = node.preset.name if preset_path is None else str(preset_path)
    cfg = _train_config(spec, base)
    points = tuple(_point(spec, site, node, cfg, n, mode) for n in spec.nodes)
    notes = tuple(node.warnings)
    return Study(spec=spec, site=site, spec_path=spec_path.resolve(), preset_ref=preset_ref, node=node,
                 train_config=cfg, points=points, memory_mode=mode, notes=notes)


def _topology(site: Site, preset_ref: str, mode: Optional[str]):
    if site.topology == "detect":
        return topology.detect()
    if site.topology != "nominal":
        return snapshot.load(site.topology)
    p, s = presets.load(preset_ref), site.node
    return presets.nominal_topology(
        p, model_name=s.model_name or (f"{site.name} node" if p.node is None else None),
        sockets=s.sockets, cores_per_socket=s.cores_per_socket, threads_per_core=s.threads_per_core,
        memory_mode=mode, where=f"site {site.name}",
        hint="give the site node: {sockets: S, cores_per_socket: C, threads_per_core: T}, or topology: detect")


def _train_config(spec: StudySpec, base: Path) -> TrainConfig:
    path = None
    if spec.train.config:
        path = Path(spec.train.config)
        path = path if path.is_absolute() else base / path
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in spec.train.set.items()]
    try:
        return train_config.load(str(path) if path else None, overrides)
    except UserError as e:
        raise UserError(f"study {spec.name}: training config: {e}") from None


def _yaml_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def _point(spec: StudySpec, site: Site, node: NodePlan, cfg: TrainConfig, nodes: int,
           mode: Optional[str]) -> Point:
    R = node.ranks_per_node
    ranks = nodes * R
    passes = cfg.horovod.backward_passes_per_step
    if spec.scaling == "weak":
        per_rank = spec.per_rank_batch or cfg.per_rank_batch
        if per_rank is None:
            raise UserError("weak scaling needs per_rank_batch (in the study or its training config)")
        global_batch = per_rank * ranks * passes
    else:
        global_batch = spec.global_batch or cfg.global_batch
        if global_batch is None:
            raise UserError("strong scaling needs global_batch (in the study or its training config)")
        if global_batch % (ranks * passes):
            raise UserError(f"strong scaling: global_batch {global_batch} does not divide over {nodes} nodes x "
                            f"{R} ranks{f' x {passes} accumulated passes' if passes > 1 else ''} = "
                            f"{ranks * passes}; pick a global batch divisible by every point's ranks "
                            f"(e.g. {_lcm_hint(spec.nodes, R * passes)}) or drop that node count")
        per_rank = global_batch // (ranks * passes)
    steps = spec.steps if spec.steps is not None else (None if spec.epochs is not None else cfg.steps)
    epochs = spec.epochs if spec.epochs is not None else (None if steps is not None else cfg.epochs)
    if steps is not None and spec.warmup_steps >= steps:
        raise UserError(f"warmup_steps ({spec.warmup_steps}) must be fewer than the {steps} steps per point")
    variables = {"nodes": nodes, "ranks": ranks, "ranks_per_node": R, "steps": steps or 0,
                 "epochs": epochs or 0, "global_batch": global_batch, "per_rank_batch": per_rank,
                 "repeats": 1 if spec.array else spec.repeats}
    minutes = walltime.minutes(spec.walltime, variables)
    queue = _queue(spec, site, nodes, minutes, mode)
    constraints = tuple(spec.constraints) if spec.constraints is not None else \
        tuple(site.constraints) + tuple(site.memory_modes.get(mode, ()) if mode else ())
    pid = f"n{nodes:04d}"
    return Point(id=pid, nodes=nodes, ranks_per_node=R, ranks=ranks, cores_per_rank=node.cores_per_rank,
                 cpus_per_task=node.cpus_per_task, global_batch=global_batch, per_rank_batch=per_rank,
                 steps=steps, epochs=epochs, walltime=walltime.format_minutes(minutes), queue=queue,
                 constraints=constraints, job_name=job_name(spec.name, nodes, site.scheduler))


def _lcm_hint(nodes, per_node: int) -> int:
    return math.lcm(*(n * per_node for n in nodes))


def _queue(spec: StudySpec, site: Site, nodes: int, minutes: float, mode: Optional[str]) -> Optional[str]:
    def fits(q) -> Optional[str]:
        if q.max_nodes is not None and nodes > q.max_nodes:
            return f"at most {q.max_nodes} nodes"
        if nodes < q.min_nodes:
            return f"at least {q.min_nodes} nodes"
        if q.max_walltime and minutes > walltime.minutes(q.max_walltime, {}):
            return f"at most {q.max_walltime}"
        if mode and q.memory_mode and q.memory_mode != mode:
            return f"{q.memory_mode} mode"
        return None
    if spec.queue:
        q = site.queue(spec.queue)
        why = fits(q) if q else None
        if why:
            raise UserError(f"queue {spec.queue} of site {site.name} takes {why}; the {nodes}-node point asks "
                            f"for {nodes} nodes, {walltime.format_minutes(minutes)}"
                            f"{f', {mode} mode' if mode else ''}: drop queue to let the site pick, or change the point")
        return spec.queue
    if not site.queues:
        return None
    for q in site.queues:
        if fits(q) is None:
            return q.name
    raise UserError(f"no queue of site {site.name} takes the {nodes}-node point ({walltime.format_minutes(minutes)}"
                    f"{f', {mode} mode' if mode else ''}): "
                    + "; ".join(f"{q.name} takes {fits(q)}" for q in site.queues))


# ---- names -----------------------------------------------------------------------------------------
def job_name(study: str, nodes: int, scheduler: str) -> str:
    """A scheduler-safe job name; PBS allows 15 characters starting with a letter."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", study).strip("_") or "study"
    if not slug[0].isalpha():
        slug = "s" + slug
    suffix = f"_n{nodes}"
    if scheduler == "pbs":
        return slug[:15 - len(suffix)].rstrip("_") + suffix
    return slug[:64] + suffix
