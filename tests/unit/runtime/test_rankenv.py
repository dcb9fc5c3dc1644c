"""A rank's local rank (knl_train/runtime/rankenv.py) under each launcher, and without one."""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.runtime import rankenv


@pytest.mark.parametrize("var", rankenv.LOCAL_RANK_VARS)
def test_local_rank_from_each_launcher(var):
    assert rankenv.local_rank(4, {var: "3"}) == 3


def test_an_mpi_launchers_local_rank_wins_over_slurms():
    # Hydra and horovodrun inside a Slurm job start per-node proxies with srun: SLURM_LOCALID=0.
    assert rankenv.local_rank(4, {"SLURM_LOCALID": "0", "MPI_LOCALRANKID": "3"}) == 3
    assert rankenv.local_rank(4, {"SLURM_LOCALID": "0", "HOROVOD_LOCAL_RANK": "2"}) == 2
    assert rankenv.local_rank(4, {"SLURM_LOCALID": "1"}) == 1


def test_local_rank_under_aprun_and_without_a_launcher():
    assert rankenv.local_rank(4, {"ALPS_APP_PE": "6"}) == 2
    assert rankenv.local_rank(1, {}) == 0
    with pytest.raises(UserError, match="cannot tell this rank's local rank.*SLURM_LOCALID"):
        rankenv.local_rank(2, {})
