"""Distributed glue: Horovod initialisation, collectives, rank-aware helpers."""

import os

# What mpirun (Open MPI), Hydra (MPICH, Intel MPI), srun and horovodrun tell each rank.
_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


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
