"""``RankEnv``: every variable a launcher or a preset passes to a rank, in one typed place.

The tuning → rank contract travels as environment variables, since a rank must read it before
TensorFlow is imported and a launcher line must not grow with the ranks. This module is the one
place that spells them: the launcher exports a ``RankEnv``'s ``to_environ()``, a preset's plan
gives each rank one, and the rank reads ``RankEnv.from_environ()``. It also says who this process
is (``launcher_rank``, ``local_rank``) from what mpirun, Hydra, srun, aprun or horovodrun set.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from knl_train.errors import UserError


def _var(name: str, doc: str, default=None):
    return field(default=default, metadata={"var": name, "doc": doc})


@dataclass(frozen=True)
class RankEnv:
    """The variables a rank reads before TensorFlow starts. Unset fields are None."""

    # ---- the launch contract: which preset, and how the node is split
    preset: Optional[str] = _var("KNL_TRAIN_PRESET", "a preset name or a preset file's path")
    ranks_per_node: Optional[int] = _var("KNL_TRAIN_RANKS_PER_NODE", "ranks on each node")
    cores_per_rank: Optional[int] = _var("KNL_TRAIN_CORES_PER_RANK", "cores bound to each rank")
    oversubscribe: Optional[bool] = _var("KNL_TRAIN_OVERSUBSCRIBE", "ranks x cores exceed the node")
    applied: Optional[bool] = _var("KNL_TRAIN_APPLIED", "this process applied its preset already")
    progress: Optional[str] = _var("KNL_TRAIN_PROGRESS", "bar (a terminal) or lines (a log file)")
    outcome: Optional[str] = _var("KNL_TRAIN_OUTCOME", "where ranks record how they ended, for "
                                  "knl-train launch (a directory)")
    # ---- a rank's threads and libraries, from its preset's plan
    intra_op: Optional[int] = _var("TF_NUM_INTRAOP_THREADS", "TF intra-op threads")
    inter_op: Optional[int] = _var("TF_NUM_INTEROP_THREADS", "TF inter-op threads")
    omp_threads: Optional[int] = _var("OMP_NUM_THREADS", "OpenMP threads (ITEX's libiomp5)")
    onednn: Optional[bool] = _var("TF_ENABLE_ONEDNN_OPTS", "TF's oneDNN kernels on or off")
    itex: Optional[bool] = _var("KNL_TRAIN_ITEX", "load the ITEX installed beside the venv")
    data_threads: Optional[int] = _var("KNL_TRAIN_DATA_THREADS", "tf.data threads when data.threads is 0")
    kmp_affinity: Optional[str] = _var("KMP_AFFINITY", "libiomp5's explicit proclist")
    kmp_blocktime: Optional[str] = _var("KMP_BLOCKTIME", "ms an OpenMP thread spins after work")
    kmp_hw_subset: Optional[str] = _var("KMP_HW_SUBSET", "hardware threads per core libiomp5 uses")
    omp_places: Optional[str] = _var("OMP_PLACES", "OpenMP places (affinity: omp)")
    omp_proc_bind: Optional[str] = _var("OMP_PROC_BIND", "OpenMP binding policy (affinity: omp)")
    horovod_thread_affinity: Optional[str] = _var("HOROVOD_THREAD_AFFINITY",
                                                  "Horovod's background thread: a CPU per local rank")
    fusion_threshold_bytes: Optional[int] = _var("HOROVOD_FUSION_THRESHOLD", "Horovod's fusion buffer")
    cycle_time_ms: Optional[float] = _var("HOROVOD_CYCLE_TIME", "Horovod's cycle time in ms")
    # ---- LARS's fused op
    lars_kernel: Optional[str] = _var("KNL_TRAIN_LARS_KERNEL", "auto, fused or tf")
    kernel_dir: Optional[str] = _var("KNL_TRAIN_KERNEL_DIR", "where the compiled fused op lives")
    kernel_isa: Optional[str] = _var("KNL_TRAIN_KERNEL_ISA", "the op's instruction set when built: "
                                     "avx2, native or generic")

    @staticmethod
    def var(name: str) -> str:
        """The environment variable behind field ``name``."""
        return _FIELDS[name].metadata["var"]

    def to_environ(self) -> Dict[str, str]:
        """The set fields as variables, in field order."""
        return {f.metadata["var"]: _format(getattr(self, f.name))
                for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None,
                     fields: Optional[Tuple[str, ...]] = None) -> "RankEnv":
        """The fields found in ``environ`` (default ``os.environ``); a malformed one is a UserError.

        ``fields``: read only these (the others stay None), so that a caller asking for one
        value is not stopped by another variable it never uses.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for name in fields or _FIELDS:
            var = _FIELDS[name].metadata["var"]
            raw = environ.get(var, "").strip()
            if raw:
                values[name] = _parse(var, raw, _TYPES[name], lenient=name in _LENIENT)
        return cls(**values)

    def replace(self, **changes) -> "RankEnv":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(RankEnv)}
# Each field's value type: the X of its Optional[X] annotation.
_TYPES = {name: next(a for a in typing.get_args(hint) if a is not type(None))
          for name, hint in typing.get_type_hints(RankEnv).items()}
# Other libraries' variables, which may hold forms we do not plan (OMP_NUM_THREADS=4,2): one we
# cannot read is reported as unknown (None), not refused; the library itself judges it.
_LENIENT = ("omp_threads", "onednn", "fusion_threshold_bytes", "cycle_time_ms")
_TRUE, _FALSE = ("1", "on", "true", "yes"), ("0", "off", "false", "no")

# What a launcher line carries, so that every rank plans its own node; left over in a launching
# shell they would change the ranks' plans, so launchers never forward them as inherited.
LAUNCH_VARS = tuple(RankEnv.var(n) for n in ("preset", "ranks_per_node", "cores_per_rank",
                                             "oversubscribe", "applied", "outcome"))
# Threading variables a plan may set; an inherited one the plan does not set would fight it.
THREADING_VARS = (*(RankEnv.var(n) for n in ("kmp_affinity", "kmp_hw_subset", "omp_places",
                                             "omp_proc_bind", "horovod_thread_affinity")),
                  "GOMP_CPU_AFFINITY")
# What every knl-train variable starts with (the autotuner starts its trials with none inherited).
VAR_PREFIX = "KNL_TRAIN_"


def _format(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parse(var: str, raw: str, kind, *, lenient: bool):
    if kind is str:
        return raw
    if kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise UserError(f"{var}={raw!r}: use 1 (on) or 0 (off)")
    try:
        value = kind(raw) if kind is float else int(raw, 10)
    except ValueError:
        value = None
    if value is None or value < 0:
        if lenient:
            return None
        what = "a whole number >= 0" if kind is int else "a number >= 0"
        raise UserError(f"{var}={raw!r} is not {what}")
    return value


def count_var(name: str, environ: Optional[Mapping[str, str]] = None) -> int:
    """A count field of ``RankEnv`` (threads, ranks, cores) from the environment; 0 if unset."""
    return getattr(RankEnv.from_environ(environ, (name,)), name) or 0


# ---- who this process is ------------------------------------------------------------------------
# What mpirun (Open MPI), Hydra (MPICH, Intel MPI), srun, horovodrun and aprun tell each rank.
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "ALPS_APP_PE")
SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# Local rank as Open MPI, Hydra (MPICH, Intel MPI), Cray PMI, horovodrun and srun set it. The
# MPI launchers' come first: started inside a Slurm job, Hydra and horovodrun launch one proxy
# per node with srun, so every rank also inherits that proxy's SLURM_LOCALID=0.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                   "HOROVOD_LOCAL_RANK", "SLURM_LOCALID")


def launcher_rank(environ: Optional[Mapping[str, str]] = None) -> int:
    """This process's rank as its launcher set it, before (or without) Horovod; 0 if none."""
    return _first_int(RANK_VARS, environ, 0)


def launcher_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """The job's number of ranks as its launcher set it; 1 if none."""
    return _first_int(SIZE_VARS, environ, 1)


def _first_int(names, environ: Optional[Mapping[str, str]], default: int) -> int:
    """The first of ``names`` set to an integer in ``environ`` (the process's by default)."""
    environ = os.environ if environ is None else environ
    for var in names:
        try:
            return int(environ[var])
        except (KeyError, ValueError):
            continue
    return default


def under_launcher(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether a parallel launcher started this process."""
    environ = os.environ if environ is None else environ
    return any(v in environ for v in SIZE_VARS)


def local_rank(ranks_per_node: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """This rank's index on its node, from its launcher's variables."""
    environ = os.environ if environ is None else environ
    for var in LOCAL_RANK_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    # aprun gives only the global rank; -N places ranks on nodes in blocks.
    if environ.get("ALPS_APP_PE", "").isdigit():
        return int(environ["ALPS_APP_PE"]) % ranks_per_node
    if ranks_per_node == 1:
        return 0
    raise UserError(f"cannot tell this rank's local rank: none of {', '.join(LOCAL_RANK_VARS)} "
                    "is set. Start ranks with mpirun, srun, mpiexec.hydra or knl-train launch.")


def field_docs() -> Tuple[Tuple[str, str, str], ...]:
    """(field, variable, meaning) for every field: the contract, for docs and ``knl-train env``."""
    return tuple((f.name, f.metadata["var"], f.metadata["doc"]) for f in dataclasses.fields(RankEnv))
