"""Site profiles: a cluster's scheduler, launcher, node type, queues and KNL modes, as YAML data.

Built-in profiles live in ``jobs/sites/`` (shipped as package data); a study may name one of
them or the path of its own file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

from knl_train import resources, yamlconfig
from knl_train.errors import UserError
from knl_train.studies import walltime
from knl_train.tuning import preset as presets

# Scheduler names, account, queue, QoS and constraint values go into directive lines, which
# the schedulers parse themselves (not a shell): allow only what such names are made of.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:@+=/,&|\[\]-]+$")


@dataclass(frozen=True)
class Queue:
    """A partition (Slurm) or queue (PBS) and its limits; the first that fits a point is used."""
    name: str
    max_nodes: Optional[int] = None
    min_nodes: int = 1
    max_walltime: Optional[str] = None
    # KNL sites with one queue per MCDRAM mode (TACC): the mode its nodes are booted in.
    memory_mode: Optional[Literal["cache", "flat"]] = None

    def __post_init__(self):
        safe_value("queues[].name", self.name)
        if self.max_walltime is not None:
            try:
                walltime.minutes(self.max_walltime, {})
            except UserError as e:
                raise ValueError(f"queue {self.name}: max_walltime: {e}") from None
        if self.max_nodes is not None and self.max_nodes < self.min_nodes:
            raise ValueError(f"queue {self.name}: max_nodes {self.max_nodes} < min_nodes {self.min_nodes}")


@dataclass(frozen=True)
class NodeSpec:
    """The compute node, where it differs from the preset's nominal node."""
    sockets: Optional[int] = None
    cores_per_socket: Optional[int] = None
    threads_per_core: Optional[int] = None
    model_name: Optional[str] = None


@dataclass(frozen=True)
class Site:
    name: str
    title: str
    scheduler: Literal["slurm", "pbs", "local"]
    launcher: Literal["srun", "mpirun", "impi", "ibrun"]
    # The threading preset for the compute nodes (a name or a preset file).
    preset: str = "generic"
    # How jobs are planned: nominal (the preset's node, with `node` on top), detect (the node
    # rendering the study: only when it is a compute node, as in tests) or a topology snapshot.
    topology: str = "nominal"
    node: NodeSpec = field(default_factory=NodeSpec)
    queues: Tuple[Queue, ...] = ()
    account: Optional[str] = None
    qos: Optional[str] = None
    constraints: Tuple[str, ...] = ()
    # KNL: the constraint a mode needs (Slurm node features, e.g. cori: flat -> knl,quad,flat).
    memory_modes: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    memory_mode: Optional[Literal["cache", "flat"]] = None
    exclusive: bool = True
    # Whether the scheduler may requeue a job (node failure, preemption): Slurm --requeue, PBS -r y.
    # False renders --no-requeue / -r n, so a lost node ends the job where status and
    # `study submit --retry-failed` see it, rather than the cluster's default rerunning it unseen.
    requeue: bool = False
    # Slurm's MPI plugin for srun (pmix for Open MPI 4; pmi2 for Intel MPI with I_MPI_PMI_LIBRARY).
    srun_mpi: Optional[str] = "pmix"
    mpirun_args: Tuple[str, ...] = ()
    env: Dict[str, str] = field(default_factory=dict)
    # Shell lines run before the launcher (module loads, venv activation): the site's own code.
    setup: Tuple[str, ...] = ()
    # Extra directive lines, verbatim after the directive prefix (e.g. "--switches=1@01:00:00").
    directives: Tuple[str, ...] = ()
    # The knl-train command on the compute nodes; None: the one rendering the study (its path).
    command: Optional[str] = None
    sources: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    path: str = ""

    def __post_init__(self):
        if self.launcher in ("srun", "ibrun") and self.scheduler != "slurm":
            raise ValueError(f"launcher {self.launcher} needs scheduler slurm (got {self.scheduler})")
        for name in ("account", "qos", "srun_mpi"):
            if getattr(self, name) is not None:
                safe_value(name, getattr(self, name))
        for c in self.constraints:
            safe_value("constraints", c)
        for mode, cons in self.memory_modes.items():
            if mode not in ("cache", "flat"):
                raise ValueError(f"memory_modes: unknown mode {mode!r}; use cache or flat")
            for c in cons:
                safe_value(f"memory_modes.{mode}", c)
        for k in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(k)):
                raise ValueError(f"env: {k!r} is not a variable name")
        for line in (*self.setup, *self.directives, *self.mpirun_args):
            if "\n" in line or "\r" in line:
                raise ValueError(f"setup, directives and mpirun_args take one line each: {line!r}")
        if self.topology not in ("nominal", "detect") and not self.topology.endswith(".json"):
            raise ValueError(f"topology must be nominal, detect or a snapshot .json, got {self.topology!r}")

    def queue(self, name: str) -> Optional[Queue]:
        return next((q for q in self.queues if q.name == name), None)

    def modes(self) -> Tuple[str, ...]:
        """The MCDRAM modes this site can give a job."""
        return tuple(sorted(set(self.memory_modes) | {q.memory_mode for q in self.queues if q.memory_mode}))


def safe_value(name: str, value: str) -> None:
    if not isinstance(value, str) or not SAFE_VALUE.match(value):
        raise ValueError(f"{name}: {value!r} has characters a directive line cannot carry safely; "
                         "use letters, digits and _ . : @ + = / , & | [ ] -")


def names() -> Tuple[str, ...]:
    return tuple(sorted(p.stem for p in resources.jobs_dir("sites").glob("*.yaml")))


def load(ref: str, base: Optional[Path] = None) -> Site:
    """A built-in site by name, or a site YAML file (relative paths from ``base``)."""
    if ref in names():
        path = resources.jobs_dir("sites") / f"{ref}.yaml"
    elif ref.endswith((".yaml", ".yml")) or "/" in ref:
        path = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
        if not path.is_file():
            raise UserError(f"site profile {path} does not exist")
    else:
        raise yamlconfig.unknown("site", ref, names(), alternative="or the path of a site YAML file")
    data = yamlconfig.load_yaml(path)
    data.setdefault("name", path.stem)
    data["path"] = str(path.resolve())
    data["memory_modes"] = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,)
                            for k, v in (data.get("memory_modes") or {}).items()}
    data["env"] = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    try:
        site = yamlconfig.from_dict(Site, data)
    except UserError as e:
        raise UserError(f"site profile {path}: {e}") from None
    if site.topology.endswith(".json") and not Path(site.topology).is_absolute():
        object.__setattr__(site, "topology", str((path.parent / site.topology).resolve()))
    return site


# ---- the node's CPU against a preset ---------------------------------------------------------------
def preset_mismatch(site: Site, chosen: presets.Preset, planned) -> Optional[str]:
    """Why preset ``chosen`` is for another CPU than the site's node, or None when it fits.

    The node's CPU is the machine's own when the site plans on a detected topology or a snapshot
    (``planned``), else the CPU of the site's own preset. A site whose preset names no CPU
    (generic) has a node of unknown family: only a preset that names none either fits it.
    """
    if site.topology != "nominal":
        if chosen.matches(planned):
            return None
        return (f"preset {chosen.name} is for {_cpu(chosen)}, but site {site.name}'s node is a "
                f"{planned.model_name} (use preset {presets.detect(planned).name})")
    own = _own_preset(site)
    if own is None or own.name == chosen.name:
        return None
    counts = (site.node.sockets, site.node.cores_per_socket, site.node.threads_per_core)
    if None in counts and own.node is not None:
        counts = tuple(c or n for c, n in zip(counts, (own.node.sockets, own.node.cores_per_socket,
                                                         own.node.threads_per_core)))
    shape = " x ".join(f"{c} {w}{'s' if c != 1 else ''}" for c, w in zip(counts, ("socket", "core", "thread"))
                       if c)
    if own.node is None:
        if not chosen.match.vendor and not chosen.match.flags:
            return None
        return (f"preset {chosen.name} is for {_cpu(chosen)}, but site {site.name}'s node "
                f"({shape}) names no CPU family: its preset is {own.name} (use preset {own.name}, "
                f"or a site profile whose preset names the node's CPU)")
    if chosen.matches(own.node):
        return None
    return (f"preset {chosen.name} is for {_cpu(chosen)}, but site {site.name}'s node is "
            f"{site.node.model_name or own.node.model_name} ({shape}) "
            f"(use preset {presets.detect(own.node).name})")


def _cpu(preset: presets.Preset) -> str:
    return preset.title.split(", ")[0]


def _own_preset(site: Site) -> Optional[presets.Preset]:
    """The site's preset, or None when it cannot say (auto, or a file that is not there)."""
    for ref in (site.preset, str(Path(site.path).parent / site.preset) if site.path else None):
        try:
            return presets.load(ref) if ref and ref != "auto" else None
        except UserError:
            continue
    return None
