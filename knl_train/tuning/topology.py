"""CPU topology of a node: sockets, cores, HW threads, NUMA nodes (KNL MCDRAM), cgroup and ISA.

Everything is read from Linux's own files (``/proc``, ``/sys``) through a tiny reader, so the
same parsing serves the live node (``detect()``) and a snapshot recorded on another node
(``snapshot.record()`` / ``snapshot.load()``). ``lscpu`` is optional: it fills in the topology when a
container hides ``sys/devices/system/cpu/cpuN/topology`` and names the hypervisor.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

from knl_train.errors import UserError

RECORD_HINT = "pass a snapshot recorded on the node with `knl-train topology --record FILE`"
ISA_ORDER = ("avx2", "avx512f", "avx512er", "avx512pf", "avx512_vnni", "avx512_bf16", "amx")
MEMORY_MODES = ("cache", "flat")

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"
CGROUP_ROOT = "sys/fs/cgroup"
LSCPU_COLUMNS = "CPU,CORE,SOCKET,NODE"


@dataclass(frozen=True)
class Cpu:
    """One online logical CPU (hardware thread)."""
    id: int
    socket: int
    core: int      # core_id as sysfs reports it: sparse on Xeons, unique only within a socket
                   # (lscpu's machine-wide core number when sysfs hides the topology)
    node: int      # NUMA node holding it, -1 if unknown


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: Tuple[int, ...]   # sorted; empty for KNL flat-mode MCDRAM
    memory_mb: int          # MemTotal of the node


@dataclass(frozen=True)
class Topology:
    """One node as Linux shows it to this process; see detect(), snapshot.load(), synthetic()."""
    vendor: str
    model_name: str
    family: int
    model: int
    flags: FrozenSet[str]
    cpus: Tuple[Cpu, ...]
    nodes: Tuple[NumaNode, ...]
    allowed: FrozenSet[int]     # online ∩ cgroup cpuset; not narrowed by this process's affinity
    affinity: FrozenSet[int]    # Cpus_allowed_list of the process that read the files
    hypervisor: str = ""
    source: str = "/"

    @property
    def sockets(self) -> int:
        return len({c.socket for c in self.cpus})

    @property
    def cores_per_socket(self) -> int:
        per_socket: Dict[int, set] = defaultdict(set)
        for c in self.cpus:
            per_socket[c.socket].add(c.core)
        return max((len(v) for v in per_socket.values()), default=0)

    @property
    def threads_per_core(self) -> int:
        return max((len(t) for t in self._threads_by_core(c.id for c in self.cpus).values()), default=0)

    def _threads_by_core(self, cpus: Iterable[int]) -> Dict[Tuple[int, int], List[int]]:
        by_id = {c.id: c for c in self.cpus}
        groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        for i in cpus:
            if i in by_id:
                groups[(by_id[i].socket, by_id[i].core)].append(i)
        return groups

    def cores(self, cpus: Optional[Iterable[int]] = None) -> Tuple[Tuple[int, ...], ...]:
        """Physical cores as tuples of their CPU ids (each tuple sorted), in logical order:
        by (socket, core_id); restricted to `cpus` (default: self.allowed). A core appears if any
        of its threads is in the set, and only those threads are listed."""
        groups = self._threads_by_core(self.allowed if cpus is None else set(cpus))
        return tuple(tuple(sorted(groups[k])) for k in sorted(groups))

    def socket_of(self, cpu: int) -> int:
        for c in self.cpus:
            if c.id == cpu:
                return c.socket
        raise UserError(f"CPU {cpu} is not online on this node ({self.source}); online CPUs: "
                        f"{format_cpulist(c.id for c in self.cpus)}")

    @property
    def mcdram_nodes(self) -> Tuple[int, ...]:
        """NUMA nodes with memory and no CPUs (KNL flat/hybrid MCDRAM)."""
        return tuple(n.id for n in self.nodes if not n.cpus and n.memory_mb > 0)

    @property
    def isa(self) -> Tuple[str, ...]:
        flags = self.flags | ({"amx"} if {"amx_tile", "amx_bf16"} <= self.flags else set())
        return tuple(f for f in ISA_ORDER if f in flags)

    @property
    def is_knl(self) -> bool:
        """Xeon Phi x200: the only line with AVX-512 ER."""
        return "avx512er" in self.flags

    def describe(self) -> str:
        """One line: model, sockets x cores x threads, NUMA nodes, ISA (and hypervisor, cgroup limit)."""
        cpu_less = [n for n in self.nodes if n.id in self.mcdram_nodes]
        text = (f"{self.model_name}: {_plural(self.sockets, 'socket')} x {_plural(self.cores_per_socket, 'core')}"
                f" x {_plural(self.threads_per_core, 'thread')}, {_plural(len(self.nodes), 'NUMA node')}")
        if cpu_less:
            gb = round(sum(n.memory_mb for n in cpu_less) / 1024)
            text += f" ({len(cpu_less)} without CPUs: {gb} GB {'MCDRAM' if self.is_knl else 'memory'})"
        if self.isa:
            text += ", ISA " + " ".join(self.isa)
        if self.hypervisor:
            text += f", hypervisor {self.hypervisor}"
        if len(self.allowed) < len(self.cpus):
            text += f", job may use {len(self.allowed)} of {len(self.cpus)} CPUs ({format_cpulist(self.allowed)})"
        return text

    def to_dict(self) -> dict:
        """JSON-able: every field (sets as sorted lists) plus the derived values, for reports."""
        return {
            "vendor": self.vendor, "model_name": self.model_name, "family": self.family, "model": self.model,
            "flags": sorted(self.flags),
            "cpus": [{"id": c.id, "socket": c.socket, "core": c.core, "node": c.node} for c in self.cpus],
            "nodes": [{"id": n.id, "cpus": list(n.cpus), "memory_mb": n.memory_mb} for n in self.nodes],
            "allowed": sorted(self.allowed), "affinity": sorted(self.affinity),
            "hypervisor": self.hypervisor, "source": self.source,
            "sockets": self.sockets, "cores_per_socket": self.cores_per_socket,
            "threads_per_core": self.threads_per_core, "mcdram_nodes": list(self.mcdram_nodes),
            "isa": list(self.isa), "is_knl": self.is_knl,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Topology":
        """Inverse of to_dict() (the derived values are recomputed, not read)."""
        try:
            return cls(vendor=d["vendor"], model_name=d["model_name"], family=int(d["family"]),
                       model=int(d["model"]), flags=frozenset(d["flags"]),
                       cpus=tuple(Cpu(int(c["id"]), int(c["socket"]), int(c["core"]), int(c["node"]))
                                  for c in d["cpus"]),
                       nodes=tuple(NumaNode(int(n["id"]), tuple(int(i) for i in n["cpus"]), int(n["memory_mb"]))
                                   for n in d["nodes"]),
                       allowed=frozenset(int(i) for i in d["allowed"]),
                       affinity=frozenset(int(i) for i in d["affinity"]),
                       hypervisor=d.get("hypervisor", ""), source=d.get("source", "/"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a topology summary (from Topology.to_dict()): {e!r}") from None



def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- cpulist syntax ------------------------------------------------------------------------------

def parse_cpulist(text: str) -> FrozenSet[int]:
    """Linux cpulist syntax ("0-3,8,10-11"; empty = none) -> set of ids."""
    out = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def format_cpulist(ids: Iterable[int], keep_order: bool = False) -> str:
    """Ids -> the kernel's compact cpulist ("0-3,8"); ``keep_order`` keeps the given order (an
    OpenMP proclist: "0-2,68-69,5"), else the ids are sorted and deduplicated."""
    runs = []
    ids = list(ids) if keep_order else sorted(set(ids))
    # consecutive ids share (id - position): each group is one range
    for _, group in itertools.groupby(enumerate(ids), key=lambda p: p[1] - p[0]):
        run = [i for _, i in group]
        runs.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(runs)


# --- reading: live files under a root (snapshot.py reads a recorded snapshot's dict) ---------------

class FsReader:
    """Files under `root`; lscpu only for the live root (it describes this machine, not `root`).

    Every reader gives ``name``, ``read(rel)``, ``listdir(rel)``, ``lscpu()`` and ``where(rel)``;
    ``parse`` needs nothing else (``snapshot.py`` has a snapshot's reader and a recording one)."""

    def __init__(self, root: str):
        self.root = root
        self.name = root
        self._lscpu: Union[None, str, bool] = False   # False = not run yet

    def read(self, rel: str) -> Optional[str]:
        try:
            with open(os.path.join(self.root, rel), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            # Missing, unreadable, or a sysfs file failing with EIO/ENODEV: all count as absent.
            return None

    def listdir(self, rel: str) -> List[str]:
        try:
            return os.listdir(os.path.join(self.root, rel))
        except OSError:
            return []

    def lscpu(self) -> Optional[str]:
        if self._lscpu is False:
            self._lscpu = _run_lscpu() if os.path.realpath(self.root) == "/" else None
        return self._lscpu

    def where(self, rel: str) -> str:
        return os.path.join(self.root, rel)


def first_processor(text: str) -> str:
    """The first processor's block of a cpuinfo file."""
    # A 272-CPU cpuinfo is 400 KB; only the first processor's block is parsed.
    return text.split("\n\n", 1)[0] + "\n"


def _run_lscpu() -> Optional[str]:
    """`lscpu` (for the hypervisor) then `lscpu -p=CPU,CORE,SOCKET,NODE`, in the C locale; None if absent."""
    exe = shutil.which("lscpu")
    if not exe:
        return None
    env = dict(os.environ, LC_ALL="C")   # the human output is translated otherwise
    parts = []
    for args in ([exe], [exe, f"-p={LSCPU_COLUMNS}"]):
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=20, env=env)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        parts.append(out.stdout)
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


# --- parsing --------------------------------------------------------------------------------------

def _cpuinfo(reader) -> Dict[str, str]:
    text = reader.read("proc/cpuinfo")
    if text is None:
        raise UserError(f"cannot read {reader.where('proc/cpuinfo')}: no CPU description; "
                        f"run on the node itself or {RECORD_HINT}")
    fields: Dict[str, str] = {}
    for line in first_processor(text).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if not fields:
        raise UserError(f"{reader.where('proc/cpuinfo')} is empty or not a cpuinfo file; {RECORD_HINT}")
    return fields


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def _lscpu_rows(text: Optional[str]) -> Dict[int, Tuple[int, int]]:
    """cpu -> (core, socket) from the parsable part of our lscpu text ("CPU,Core,Socket,Node" rows)."""
    rows = {}
    for line in (text or "").splitlines():
        cols = line.split(",")
        if len(cols) >= 3 and cols[0].isdigit():
            rows[int(cols[0])] = (_int(cols[1]), _int(cols[2]))
    return rows


def _lscpu_hypervisor(text: Optional[str]) -> str:
    m = re.search(r"^\s*Hypervisor vendor:\s*(\S.*?)\s*$", text or "", re.M)
    return m.group(1) if m else ""


def _online(reader) -> FrozenSet[int]:
    rel = f"{CPU_DIR}/online"
    text = reader.read(rel)
    if text is not None:
        try:
            cpus = parse_cpulist(text)
        except ValueError:
            raise UserError(f"{reader.where(rel)} is not a CPU list ({text.strip()!r}); {RECORD_HINT}") from None
        if cpus:
            return cpus
    rows = _lscpu_rows(reader.lscpu())
    if rows:
        return frozenset(rows)
    raise UserError(f"cannot read {reader.where(rel)} (the online CPUs) and lscpu is not available; {RECORD_HINT}")


def _placement(reader, online: FrozenSet[int]) -> Dict[int, Tuple[int, int]]:
    """cpu -> (socket, core_id) from sysfs, or from lscpu when a container hides the topology."""
    out = {}
    missing = None
    for cpu in sorted(online):
        base = f"{CPU_DIR}/cpu{cpu}/topology"
        pkg, core = reader.read(f"{base}/physical_package_id"), reader.read(f"{base}/core_id")
        if pkg is None or core is None:
            missing = f"{base}/{'physical_package_id' if pkg is None else 'core_id'}"
            break
        out[cpu] = (_int(pkg.strip()), _int(core.strip()))
    if missing is None:
        return out
    rows = _lscpu_rows(reader.lscpu())
    if not online <= set(rows):
        raise UserError(f"cannot read {reader.where(missing)} and lscpu does not cover the online CPUs; "
                        f"{RECORD_HINT}")
    # lscpu's CORE is its own logical core number (unique across sockets), not sysfs core_id.
    return {cpu: (rows[cpu][1], rows[cpu][0]) for cpu in online}


def _node_memory_mb(text: Optional[str]) -> int:
    m = re.search(r"MemTotal:\s*(\d+)\s*kB", text or "")
    return int(m.group(1)) // 1024 if m else 0


def _nodes(reader, online: FrozenSet[int]) -> Tuple[NumaNode, ...]:
    ids = sorted(int(m.group(1)) for name in reader.listdir(NODE_DIR) if (m := re.fullmatch(r"node(\d+)", name)))
    nodes = []
    for i in ids:
        rel = f"{NODE_DIR}/node{i}/cpulist"
        cpulist = reader.read(rel)
        if cpulist is None:
            continue
        try:
            cpus = tuple(sorted(parse_cpulist(cpulist) & online))
        except ValueError:
            raise UserError(f"{reader.where(rel)} is not a CPU list ({cpulist.strip()!r}); {RECORD_HINT}") from None
        nodes.append(NumaNode(i, cpus, _node_memory_mb(reader.read(f"{NODE_DIR}/node{i}/meminfo"))))
    if nodes:
        return tuple(nodes)
    # No NUMA support in the kernel (or no /sys/devices/system/node in the container).
    return (NumaNode(0, tuple(sorted(online)), _node_memory_mb(reader.read("proc/meminfo"))),)


def _cgroup_cpus(reader) -> Optional[FrozenSet[int]]:
    """The cpuset of this process's cgroup (v2 first, then v1), walking up to the nearest file."""
    text = reader.read("proc/self/cgroup")
    if text is None:
        return None
    v2 = v1 = None
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2 = path
        elif "cpuset" in controllers.split(","):
            v1 = path
    for base, path, leaf in ((CGROUP_ROOT, v2, "cpuset.cpus.effective"),
                             (f"{CGROUP_ROOT}/cpuset", v1, "cpuset.cpus")):
        if path is None:
            continue
        parts = [p for p in path.split("/") if p]
        # Inside a container the cgroup path may be the host's while sys/fs/cgroup is the
        # container's own subtree: walking up ends at the mounted root.
        for depth in range(len(parts), -1, -1):
            found = reader.read("/".join([base, *parts[:depth], leaf]))
            if found is not None and found.strip():
                try:
                    return parse_cpulist(found)
                except ValueError:
                    break
    return None


def _affinity(reader) -> Optional[FrozenSet[int]]:
    m = re.search(r"^Cpus_allowed_list:\s*(\S*)", reader.read("proc/self/status") or "", re.M)
    return parse_cpulist(m.group(1)) if m else None


def parse(reader, source: str) -> Topology:
    """The topology a reader's files describe (``source`` names them)."""
    info = _cpuinfo(reader)
    flags = frozenset(info.get("flags", "").split())
    online = _online(reader)
    placement = _placement(reader, online)
    nodes = _nodes(reader, online)
    node_of = {cpu: n.id for n in nodes for cpu in n.cpus}
    cpus = tuple(Cpu(i, placement[i][0], placement[i][1], node_of.get(i, -1)) for i in sorted(online))
    cgroup = _cgroup_cpus(reader)
    allowed = online & cgroup if cgroup is not None else online
    affinity = _affinity(reader)
    hypervisor = ""
    if "hypervisor" in flags:
        hypervisor = _lscpu_hypervisor(reader.lscpu()) or "unknown"
    return Topology(vendor=info.get("vendor_id", ""), model_name=info.get("model name", ""),
                    family=_int(info.get("cpu family", "")), model=_int(info.get("model", "")),
                    flags=flags, cpus=cpus, nodes=nodes, allowed=allowed,
                    affinity=affinity if affinity is not None else allowed,
                    hypervisor=hypervisor, source=source)


# --- public entry points --------------------------------------------------------------------------

def detect(root: str = "/") -> Topology:
    """The topology described by the files under `root` (the live node by default)."""
    return parse(FsReader(root), root)


def synthetic(model_name: str, vendor: str, flags: Union[str, Iterable[str]], sockets: int,
              cores_per_socket: int, threads_per_core: int, memory_gb: float = 0,
              numa_per_socket: int = 1, mcdram_gb: float = 0, memory_mode: str = "cache",
              family: int = 6, model: int = 0) -> Topology:
    """A nominal node with Linux's usual numbering, to plan jobs for a node type we are not on.

    CPU ids run over the first thread of every core (socket 0's cores, then socket 1's...), then
    all second threads, and so on; core ids are 0..n-1 per socket. `memory_gb` (DDR, whole node;
    0 = unknown) is split evenly over the sockets' NUMA nodes; memory_mode "flat" adds one CPU-less
    node of `mcdram_gb` (KNL quad-flat), "cache" adds nothing.
    """
    if min(sockets, cores_per_socket, threads_per_core, numa_per_socket) < 1:
        raise UserError("synthetic topology: sockets, cores_per_socket, threads_per_core and numa_per_socket "
                        "must all be >= 1")
    if numa_per_socket > cores_per_socket:
        raise UserError(f"synthetic topology: {numa_per_socket} NUMA nodes per socket but only "
                        f"{cores_per_socket} cores")
    if memory_mode not in MEMORY_MODES:
        raise UserError(f"unknown memory_mode {memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    if memory_mode == "flat" and mcdram_gb <= 0:
        raise UserError("memory_mode 'flat' needs mcdram_gb > 0 (the size of the CPU-less MCDRAM node)")
    flag_set = frozenset(flags.split() if isinstance(flags, str) else flags)
    total_cores = sockets * cores_per_socket
    node_cpus: Dict[int, List[int]] = defaultdict(list)
    cpus = []
    for t in range(threads_per_core):
        for s in range(sockets):
            for c in range(cores_per_socket):
                cpu = t * total_cores + s * cores_per_socket + c
                node = s * numa_per_socket + c * numa_per_socket // cores_per_socket
                cpus.append(Cpu(cpu, s, c, node))
                node_cpus[node].append(cpu)
    ddr_nodes = sockets * numa_per_socket
    per_node_mb = int(memory_gb * 1024) // ddr_nodes
    nodes = [NumaNode(n, tuple(sorted(node_cpus[n])), per_node_mb) for n in range(ddr_nodes)]
    if memory_mode == "flat":
        nodes.append(NumaNode(ddr_nodes, (), int(mcdram_gb * 1024)))
    every = frozenset(c.id for c in cpus)
    return Topology(vendor=vendor, model_name=model_name, family=family, model=model, flags=flag_set,
                    cpus=tuple(sorted(cpus, key=lambda c: c.id)), nodes=tuple(nodes),
                    allowed=every, affinity=every, source="synthetic")
