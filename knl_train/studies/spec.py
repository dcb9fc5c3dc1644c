"""The study spec (YAML): what to run, where, and how; validated and expanded into points.

Two kinds: a scaling study (the default) runs one point per node count and measures images/s;
a convergence study (``kind: convergence``) runs one point per (optimizer, global batch, peak
LR, repeat) on a fixed number of nodes and measures accuracy, making each global batch out of
per-rank micro-batches and gradient accumulation. Everything a job script needs is worked out
here, before anything is written: the node plan from the tuning preset, batch sizes and training
overrides per point, the queue that fits, the walltime. What would fail a job at its start is an
error here: an unknown model or queue, a preset for another CPU than the site's node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from knl_train import yamlconfig
from knl_train.errors import UserError
from knl_train.models.model_names import MODEL_NAMES
from knl_train.studies import sites as site_profiles, walltime
from knl_train.studies.schema import (IMAGENET_TRAIN_IMAGES, LABEL, PER_POINT, OptimizerTrial,
                                      StudySpec, TrainRef)
from knl_train.studies.sites import Site
from knl_train.train import config as train_config
from knl_train.train.config import TrainConfig
from knl_train.tuning import plan as tuning_plan, preset as presets, snapshot, topology
from knl_train.tuning.plan import NodePlan

# The fields' own dataclasses live in .schema; spec is where callers find them.
__all__ = ["IMAGENET_TRAIN_IMAGES", "LABEL", "PER_POINT", "OptimizerTrial", "Point", "Study",
           "StudySpec", "TrainRef", "expand", "job_name", "load"]


@dataclass(frozen=True)
class Point:
    """One job script: a node count of a scaling study, or one training of a convergence study."""
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
    # The training config's overrides for this point, as `--set key=value` words.
    overrides: Tuple[str, ...] = ()
    # A convergence study's point: the optimizer's label, its peak LR at the reference batch, the
    # repeat, and the micro-batches each rank accumulates per update.
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    repeat: Optional[int] = None
    accumulation: int = 1

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
    if isinstance(data.get("nodes"), int) and not isinstance(data.get("nodes"), bool):
        data["nodes"] = [data["nodes"]]
    kind = data.get("kind", "scaling")
    if kind not in ("scaling", "convergence"):
        raise UserError(f"study {path}: kind: {kind!r} is not one of scaling, convergence"
                        f"{yamlconfig.did_you_mean(str(kind), ('scaling', 'convergence'))}")
    required = ("name", "site", "nodes") + (("epochs",) if data.get("kind") == "convergence" else ("scaling",))
    for key in required:
        if key not in data:
            raise UserError(f"study {path}: {key!r} is required (see jobs/studies/ for examples)")
    try:
        spec = yamlconfig.from_dict(StudySpec, data)
    except UserError as e:
        # from_dict says "config:" for the spec's own checks: here the file names it.
        raise UserError(f"study {path}: {str(e).removeprefix('config: ')}") from None
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
    if site.scheduler == "local" and (max(spec.nodes) > 1 or spec.array):
        raise UserError(f"site {site.name} runs on this node, one point after another: "
                        + ("array: true needs a scheduler's job arrays; remove it" if spec.array else
                           f"nodes {list(spec.nodes)} asks for more than this one node; use nodes: 1"))
    preset_arg = spec.preset or site.preset
    preset_path = Path(preset_arg) if preset_arg.endswith((".yaml", ".yml")) else None
    if preset_path is not None and not preset_path.is_absolute():
        preset_path = (base / preset_path).resolve()
    ref = preset_arg if preset_path is None else str(preset_path)
    topo = _topology(site, ref, mode)
    notes = _check_preset(spec, site, presets.detect(topo) if ref == "auto" else presets.load(ref), topo)
    node = tuning_plan.node_plan(ref, spec.ranks_per_node, cores_per_rank=spec.cores_per_rank, topology=topo)
    preset_ref = node.preset.name if preset_path is None else str(preset_path)
    cfg = _train_config(spec, base)
    if spec.kind == "convergence":
        points = _convergence_points(spec, site, node, base, mode)
    else:
        points = tuple(_point(spec, site, node, cfg, n, mode) for n in spec.nodes)
    if spec.queue and not site.queues:
        notes += (f"queue {spec.queue} is passed on unchecked: site {site.name} lists no queues "
                  "(list them under queues: in a copy of the site profile to have them checked)",)
    notes += tuple(node.warnings)
    return Study(spec=spec, site=site, spec_path=spec_path.resolve(), preset_ref=preset_ref, node=node,
                 train_config=cfg, points=points, memory_mode=mode, notes=notes)


def _check_preset(spec: StudySpec, site: Site, chosen: presets.Preset, topo) -> Tuple[str, ...]:
    """A preset for another CPU than the site's node is an error unless the spec allows it."""
    why = site_profiles.preset_mismatch(site, chosen, topo)
    if why is None:
        return ()
    if not spec.allow_preset_mismatch:
        raise UserError(f"{why}; or set allow_preset_mismatch: true in the study to plan "
                        f"{chosen.name}'s rules on this node anyway")
    return (f"allow_preset_mismatch: {why}",)


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


def _train_config(spec: StudySpec, base: Path, extra: Dict[str, Any] = None,
                  where: str = "training config") -> TrainConfig:
    path = None
    if spec.train.config:
        path = Path(spec.train.config)
        path = path if path.is_absolute() else base / path
    overrides = _words({**spec.train.set, **(extra or {})})
    try:
        cfg = train_config.load(str(path) if path else None, overrides)
    except UserError as e:
        raise UserError(f"study {spec.name}: {where}: {e}") from None
    if cfg.model not in MODEL_NAMES:
        # Checked here, from the TensorFlow-free list: every job would fail at its start.
        raise UserError(f"study {spec.name}: {where}: "
                        f"{yamlconfig.unknown('model', cfg.model, MODEL_NAMES)}")
    return cfg


def _words(settings: Dict[str, Any]) -> List[str]:
    return [f"{k}={_yaml_scalar(v)}" for k, v in settings.items()]


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
    constraints = _constraints(spec, site, mode)
    pid = f"n{nodes:04d}"
    overrides = ((f"per_rank_batch={per_rank}",) if spec.scaling == "weak" else (f"global_batch={global_batch}",)) \
        + ((f"steps={steps}",) if steps is not None else (f"epochs={epochs}",))
    return Point(id=pid, nodes=nodes, ranks_per_node=R, ranks=ranks, cores_per_rank=node.cores_per_rank,
                 cpus_per_task=node.cpus_per_task, global_batch=global_batch, per_rank_batch=per_rank,
                 steps=steps, epochs=epochs, walltime=walltime.format_minutes(minutes), queue=queue,
                 constraints=constraints, job_name=job_name(spec.name, nodes, site.scheduler),
                 overrides=overrides)


def _convergence_points(spec: StudySpec, site: Site, node: NodePlan, base: Path,
                        mode: Optional[str]) -> Tuple[Point, ...]:
    """One point per (optimizer, global batch, peak LR, repeat), in that order."""
    nodes, R = spec.nodes[0], node.ranks_per_node
    ranks = nodes * R
    micro = spec.per_rank_batch or _train_config(spec, base).per_rank_batch
    if micro is None:
        raise UserError("per_rank_batch: a convergence study needs the micro-batch each rank computes "
                        "at once (in the study or its training config)")
    per_pass = ranks * micro
    for b in spec.global_batches:
        if b % per_pass:
            raise UserError(f"global_batches: {b} cannot be made of {nodes} node(s) x {R} ranks x "
                            f"per_rank_batch {micro} = {per_pass} images per pass, accumulated; "
                            f"use multiples of {per_pass}")
    reference = spec.reference_batch or spec.global_batches[0]
    out: List[Point] = []
    for label, trial in spec.optimizers.items():
        seed = _train_config(spec, base, trial.set, f"optimizers.{label}.set").seed
        for b in spec.global_batches:
            passes = b // per_pass
            variables = {"nodes": nodes, "ranks": ranks, "ranks_per_node": R, "steps": 0,
                         "epochs": spec.epochs, "global_batch": b, "per_rank_batch": micro,
                         "repeats": 1, "accumulation": passes}
            minutes = walltime.minutes(spec.walltime, variables)
            for lr in trial.lr:
                for r in range(spec.repeats):
                    point_id = f"{label}-b{b:06d}-lr{lr:g}-r{r}"
                    overrides = (*_words(trial.set), f"global_batch={b}",
                                 f"horovod.backward_passes_per_step={passes}", f"epochs={spec.epochs}",
                                 f"schedule.reference_batch={reference}", f"schedule.peak_lr={lr!r}",
                                 *((f"seed={seed + r}",) if r else ()))
                    out.append(Point(
                        id=point_id, nodes=nodes, ranks_per_node=R, ranks=ranks,
                        cores_per_rank=node.cores_per_rank, cpus_per_task=node.cpus_per_task,
                        global_batch=b, per_rank_batch=micro, steps=None, epochs=spec.epochs,
                        walltime=walltime.format_minutes(minutes),
                        queue=_queue(spec, site, nodes, minutes, mode), constraints=_constraints(spec, site, mode),
                        job_name=job_name(spec.name, f"p{len(out) + 1}", site.scheduler),
                        overrides=overrides, optimizer=label, lr=lr, repeat=r, accumulation=passes))
    return tuple(out)


def _constraints(spec: StudySpec, site: Site, mode: Optional[str]) -> Tuple[str, ...]:
    if spec.constraints is not None:
        return tuple(spec.constraints)
    return tuple(site.constraints) + tuple(site.memory_modes.get(mode, ()) if mode else ())


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
        if q is None and site.queues:
            raise UserError(f"queue {spec.queue}: site {site.name} has no such queue"
                            f"{yamlconfig.did_you_mean(spec.queue, [x.name for x in site.queues])}; "
                            f"its queues: {', '.join(x.name for x in site.queues)} "
                            "(or drop queue to let the site pick)")
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
def job_name(study: str, point: Union[int, str], scheduler: str) -> str:
    """A scheduler-safe job name, ending in the node count (an int) or a point's tag (a str);
    PBS allows 15 characters starting with a letter."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", study).strip("_") or "study"
    if not slug[0].isalpha():
        slug = "s" + slug
    suffix = f"_n{point}" if isinstance(point, int) else f"_{point}"
    if scheduler == "pbs":
        return slug[:15 - len(suffix)].rstrip("_") + suffix
    return slug[:64] + suffix
