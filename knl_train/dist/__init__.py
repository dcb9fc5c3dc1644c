"""Distributed glue: Horovod initialisation, collectives, rank-aware helpers."""

import os
from typing import Mapping

from knl_train.errors import UserError

# What mpirun (Open MPI), Hydra (MPICH, Intel MPI), srun and horovodrun tell each rank.
_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# Local rank as Open MPI, Hydra (MPICH, Intel MPI), Cray PMI, horovodrun and srun set it. The
# MPI launchers' come first: started inside a Slurm job, Hydra and horovodrun launch one proxy
# per node with srun, so every rank also inherits that proxy's SLURM_LOCALID=0.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                   "HOROVOD_LOCAL_RANK", "SLURM_LOCALID")


def launcher_rank() -> int:
    """This process's rank as its launcher set it, before (or without) Horovod; 0 if none."""
    for var in _RANK_VARS:
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return 0


def under_launcher() -> bool:
    """Whether a parallel launcher started this process."""
    return any(v in os.environ for v in _SIZE_VARS)


def local_rank(ranks_per_node: int, environ: Mapping[str, str] = os.environ) -> int:
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
