"""Threading presets: per CPU family, as cited YAML data (``knl_train/tuning/presets/*.yaml``).

A preset says how to lay ranks and threads onto a node: how many ranks per node (or socket),
how many of each rank's cores to leave to Horovod's background thread and tf.data, how many
hardware threads per core to compute on, the TF and OpenMP thread settings, ITEX and oneDNN on
or off, Horovod's fusion buffer and cycle time, and the memory policy. The numbers are rules
relative to the node, so a preset also plans a node it was not written for (with a warning);
``plan.plan`` turns a preset and a topology into per-rank cores and environment.

A preset is a hypothesis until measured: ``knl-train tune`` writes the best measured setting as
a preset file of the same format, which ``env`` and ``launch`` accept.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Union

import yaml

from knl_train import resources, yamlconfig
from knl_train.atomic import write_text_atomic
from knl_train.errors import UserError
from knl_train.tuning import topology as topologies
from knl_train.tuning.topology import Topology


@dataclass(frozen=True)
class Settings:
    """What a rank gets. Every field can be set per layout."""
    # Cores per rank left to Horovod's background thread and tf.data (Intel Caffe/MLSL: 4 on
    # KNL, 2 on SKX). Kept only while they are at most a fifth of the rank's cores.
    spare_cores: int = 0
    # Hardware threads each compute core runs (ALCF Theta: 2 on KNL; Intel: 1 on Xeon).
    threads_per_core: int = 1
    # How OpenMP (ITEX's libiomp5) pins: kmp = KMP_AFFINITY explicit proclist; omp =
    # OMP_PLACES + OMP_PROC_BIND (libiomp5 warns when both styles are set, so one is emitted).
    affinity: Literal["kmp", "omp"] = "kmp"
    # TF intra-op threads; 0 = one per compute hardware thread.
    intra_op: int = 0
    inter_op: int = 1
    data_threads: int = 1
    kmp_blocktime: int = 1
    itex: bool = False
    onednn: bool = True
    fusion_threshold_mb: float = 128.0
    cycle_time_ms: float = 1.0
    # mcdram: numactl --preferred=<the CPU-less MCDRAM node> in KNL flat mode; local: first touch.
    memory: Literal["local", "mcdram"] = "local"

    def __post_init__(self):
        yamlconfig.at_least(self, 0, "spare_cores", "intra_op", "kmp_blocktime", "fusion_threshold_mb",
                            "cycle_time_ms")
        yamlconfig.at_least(self, 1, "threads_per_core", "inter_op", "data_threads")


@dataclass(frozen=True)
class Match:
    """Which detected CPUs the preset is for: the vendor and every flag listed."""
    vendor: str = ""
    flags: Tuple[str, ...] = ()
    # The most specific matching preset wins (SPR has every ICX flag, and more).
    priority: int = 0


@dataclass(frozen=True)
class Node:
    """The node the preset was written for: planned with ``--topology nominal``."""
    model_name: str = "generic x86-64"
    vendor: str = "GenuineIntel"
    flags: Tuple[str, ...] = ()
    sockets: int = 1
    cores_per_socket: int = 1
    threads_per_core: int = 1
    memory_gb: int = 0
    mcdram_gb: int = 0
    memory_mode: Literal["none", "cache", "flat"] = "none"


@dataclass(frozen=True)
class Layout:
    """Settings for one rank count: per node (KNL) or per socket (multi-socket Xeon)."""
    ranks_per_node: int = 0
    ranks_per_socket: int = 0
    settings: Dict[str, Any] = field(default_factory=dict)

    def ranks_on(self, sockets: int) -> int:
        return self.ranks_per_node or self.ranks_per_socket * sockets


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    match: Match = Match()
    node: Optional[Node] = None
    # Default layout: ranks per node if set, else ranks per socket x sockets.
    ranks_per_node: int = 0
    ranks_per_socket: int = 1
    settings: Settings = Settings()
    layouts: Tuple[Layout, ...] = ()
    sources: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    # Written by the tuner: what was measured, for the record.
    measured: Optional[Dict[str, Any]] = None
    path: str = ""

    def default_ranks(self, sockets: int) -> int:
        return self.ranks_per_node or self.ranks_per_socket * max(1, sockets)

    def settings_for(self, ranks_per_node: int, sockets: int) -> Settings:
        """The base settings with the matching layout's on top."""
        for layout in self.layouts:
            if layout.ranks_on(sockets) == ranks_per_node:
                return dataclasses.replace(self.settings, **layout.settings)
        return self.settings

    def matches(self, topology) -> bool:
        if self.match.vendor and self.match.vendor != topology.vendor:
            return False
        return set(self.match.flags) <= set(topology.flags)

    def to_yaml(self) -> str:
        data = yamlconfig.plain(dataclasses.asdict(self))
        data.pop("path")
        if data["measured"] is None:
            data.pop("measured")
        if data["node"] is None:
            data.pop("node")
        # Layouts are written as they are read: the rank count beside the settings.
        data["layouts"] = [{("ranks_per_node" if l.ranks_per_node else "ranks_per_socket"):
                            l.ranks_per_node or l.ranks_per_socket, **l.settings}
                           for l in self.layouts]
        return yaml.safe_dump(data, sort_keys=False, width=100)


def _from_data(data: Dict[str, Any], where: str, path: str = "") -> Preset:
    data = dict(data)
    layouts = []
    for i, raw in enumerate(data.pop("layouts", None) or ()):
        if not isinstance(raw, dict):
            raise UserError(f"{where}: layouts[{i}] must be a mapping")
        raw = dict(raw)
        keys = [k for k in ("ranks_per_node", "ranks_per_socket") if k in raw]
        if len(keys) != 1:
            raise UserError(f"{where}: layouts[{i}] needs exactly one of ranks_per_node or "
                            f"ranks_per_socket")
        count = raw.pop(keys[0])
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UserError(f"{where}: layouts[{i}].{keys[0]} must be a positive integer, got {count!r}")
        # Validate the layout's settings now, field by field, as the base settings are.
        _checked(Settings, raw, where, f"layouts[{i}]")
        layouts.append(Layout(**{keys[0]: count}, settings=raw))
    preset = _checked(Preset, data, where)
    return dataclasses.replace(preset, layouts=tuple(layouts), path=path)


def _checked(cls, data, where: str, field_path: str = ""):
    try:
        return yamlconfig.from_dict(cls, data, field_path)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _read(text: str, where: str) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a mapping (name, title, settings, ...)")
    return data


# The built-in presets: package data beside this module.
PACKAGE = "knl_train.tuning.presets"


@functools.lru_cache(maxsize=None)
def _builtin() -> Dict[str, Preset]:
    out = {}
    for entry in sorted(resources.path(PACKAGE).iterdir()):
        if entry.name.endswith(".yaml"):
            where = f"preset file {entry.name}"
            preset = _from_data(_read(entry.read_text(encoding="utf-8"), where), where)
            if f"{preset.name}.yaml" != entry.name:
                raise UserError(f"{where}: its name is {preset.name!r}; name and file must agree")
            out[preset.name] = preset
    return out


def names() -> Tuple[str, ...]:
    return tuple(sorted(_builtin()))


def builtin() -> Tuple[Preset, ...]:
    return tuple(_builtin()[n] for n in names())


def load(name_or_path: str) -> Preset:
    """A built-in preset by name, or a preset YAML file (e.g. written by ``knl-train tune``)."""
    if name_or_path in _builtin():
        return _builtin()[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"preset file {path} does not exist")
        where = f"preset file {path}"
        return _from_data(_read(path.read_text(encoding="utf-8"), where), where,
                          str(path.resolve()))
    raise yamlconfig.unknown("preset", name_or_path, names(), "or the path of a preset YAML file")


def detect(topology) -> Preset:
    """The most specific built-in preset that matches the CPU (``generic`` always does)."""
    return max((p for p in builtin() if p.matches(topology)),
               key=lambda p: (p.match.priority, p.name))


def dump(preset: Preset, path) -> None:
    write_text_atomic(path, preset.to_yaml())


def nominal_topology(preset: Union[Preset, str], *, model_name: Optional[str] = None,
                     sockets: Optional[int] = None, cores_per_socket: Optional[int] = None,
                     threads_per_core: Optional[int] = None, memory_mode: Optional[str] = None,
                     where: str = "", hint: str = "") -> Topology:
    """The node ``preset`` (or a preset name or file) was written for, as a synthetic topology.

    The arguments given replace the preset's node (a site's own node type); a preset that names
    no node needs all three counts, and is then a generic Intel node. When neither says what to
    plan for, the error starts with ``where`` and ends with ``hint``. The memory mode (KNL:
    cache or flat) is ``memory_mode`` or the preset node's.
    """
    p = load(preset) if isinstance(preset, str) else preset
    n = p.node
    if n is None:
        if None in (sockets, cores_per_socket, threads_per_core):
            raise UserError(f"{where + ': ' if where else ''}preset {p.name} names no node to plan for"
                            + (f"; {hint}" if hint else ""))
        return topologies.synthetic(model_name or Node.model_name, "GenuineIntel", (), sockets,
                                    cores_per_socket, threads_per_core)
    mode = memory_mode or (n.memory_mode if n.memory_mode != "none" else "cache")
    return topologies.synthetic(model_name or n.model_name, n.vendor, n.flags, sockets or n.sockets,
                                cores_per_socket or n.cores_per_socket,
                                threads_per_core or n.threads_per_core, memory_gb=n.memory_gb,
                                mcdram_gb=n.mcdram_gb, memory_mode=mode)
