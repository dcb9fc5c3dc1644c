"""Fixtures shared by the test packages, one per real component, and the markers they imply.

- ``hvd``: Horovod's Keras module, initialised in this process as one rank.
- ``launch``: run a command on N real ranks through ``knl-train launch`` (marks the test ``mpi``).
- ``background``: start such a job without waiting for it; killed at the end (marks it ``mpi``).
- ``tiny_dataset``: a 4-class, 16 px mini-ImageNet of real JPEG files, made once per session.
- ``slurm``, ``slurm2``: a real one-node and a fake two-node Slurm cluster on this host, started
  once per session and skipped when Slurm is absent (mark the test ``slurm``).
- ``big``: the big ImageNet networks, each built once per test module.
- ``fakes``, ``job_script``: fake scheduler commands on a private PATH, and a job script to submit.

Helpers the tests import live in tests/support (``from tests.support import run_cli``).
"""

from __future__ import annotations

import os

import pytest

from tests.support import BackgroundJob, run_cli
from tests.support.schedulers import Fakes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A test that asks for one of these fixtures, directly or through another fixture, gets the mark.
MARKS_BY_FIXTURE = {"launch": "mpi", "background": "mpi", "slurm": "slurm", "slurm2": "slurm"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, mark in MARKS_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="module")
def hvd():
    """Horovod's Keras module, initialised in this process (one rank)."""
    import horovod.tensorflow.keras as hvd
    hvd.init()
    assert hvd.size() == 1
    return hvd


@pytest.fixture(scope="session")
def launch():
    """Run a command on N real ranks through ``knl-train launch`` (mpirun or horovodrun --gloo)."""
    def _launch(*command, np=2, controller="mpi", timeout=300):
        extra = ["--oversubscribe"] if np > len(os.sched_getaffinity(0)) else []
        return run_cli("launch", "-np", np, "--controller", controller, *extra, "--", *command,
                       timeout=timeout)
    return _launch


@pytest.fixture()
def background():
    """Start jobs with ``background(*command)``; whatever is left running is killed at the end."""
    jobs = []

    def _start(*command, np=2, controller="mpi"):
        jobs.append(BackgroundJob(*command, np=np, controller=controller))
        return jobs[-1]
    yield _start
    for job in jobs:
        job.kill()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 4-class, 16 px mini-ImageNet of real JPEG files: 480 train, 40 val (made once)."""
    from knl_train.data.demo import DemoSpec, make_demo
    out = tmp_path_factory.mktemp("data") / "tiny"
    make_demo(out, DemoSpec(classes=4, train_per_class=120, val_per_class=10, size=16, seed=3),
              progress=False)
    return out


# ---- real Slurm clusters (tests/support/slurm_cluster.py; skipped when Slurm is absent) ----
def _slurm_cluster(tmp_path_factory, name, nodes):
    from tests.support.slurm_cluster import SlurmCluster, available
    reason = available()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp(name), nodes) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm cluster (node "localhost", partition "debug"); see cluster.env()."""
    yield from _slurm_cluster(tmp_path_factory, "slurm1", ("localhost",))


@pytest.fixture(scope="session")
def slurm2(tmp_path_factory):
    """A real fake 2-node Slurm cluster (nodes n1, n2: two slurmd on this host)."""
    yield from _slurm_cluster(tmp_path_factory, "slurm2", ("n1", "n2"))


# ---- the big networks (tests/unit/models) ----------------------------------------------------
@pytest.fixture(scope="module")
def big():
    """Each big model built once at 1000 classes, 224 px (graph only, never trained)."""
    from knl_train import models
    built = {}

    def get(name):
        if name not in built:
            built[name] = models.build(name, num_classes=1000, image_size=224)
        return built[name]
    return get


# ---- fake scheduler commands (tests/unit/studies/schedulers) ---------------------------------
@pytest.fixture()
def fakes(tmp_path):
    """Fake sbatch/squeue/sacct/qsub/qstat, added per test into a bin/ that is alone on PATH."""
    return Fakes(tmp_path)


@pytest.fixture()
def job_script(tmp_path):
    """An (empty) job script where a study puts one: points/n0001/job.sbatch."""
    point = tmp_path / "points" / "n0001"
    point.mkdir(parents=True)
    path = point / "job.sbatch"
    path.write_text("#!/bin/bash\n")
    return path
