"""Which ``mpirun`` is on PATH: the Open MPI lines tests expect are skipped under another MPI."""

from __future__ import annotations

import shutil

import pytest

from knl_train.tuning import launch

MPIRUN = shutil.which("mpirun")
FLAVOUR = launch.mpi_flavour(MPIRUN) if MPIRUN else "absent"

needs_openmpi = pytest.mark.skipif(
    FLAVOUR != "openmpi", reason=f"these lines are Open MPI's; mpirun here is {MPIRUN} ({FLAVOUR})")
