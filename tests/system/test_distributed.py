"""Real multi-process runs: mpirun (and horovodrun --gloo) with 2 ranks and a real Horovod."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.support import SCRIPTS


def _arrays(npz, prefix):
    return {k: npz[k] for k in npz.files if k.startswith(prefix)}


@pytest.mark.parametrize("controller", ["mpi", pytest.param("gloo", marks=pytest.mark.slow)])
def test_two_ranks_end_bit_identical_with_lower_loss(launch, tmp_path, controller):
    proc = launch(sys.executable, SCRIPTS / "hvd_steps.py", tmp_path, 20, controller=controller)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert int(r0["size"]) == 2 and str(r0["controller"]) == controller
    # Trainable weights agree bit for bit from the allreduce alone; after averaging the BN
    # moving statistics, every variable does.
    for prefix, min_count in (("t", 10), ("w", 18)):
        a, b = _arrays(r0, prefix), _arrays(r1, prefix)
        assert a.keys() == b.keys() and len(a) >= min_count
        for name in a:
            assert a[name].tobytes() == b[name].tobytes(), f"rank weights differ in {name}"
    # Training moved the weights and lowered the loss on a held-out batch.
    assert float(r0["after"]) < 0.8 * float(r0["before"])
    assert float(r0["before"]) == float(r1["before"])
