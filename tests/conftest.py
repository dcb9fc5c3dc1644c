"""Shared fixtures: one per real component (mpirun + Horovod, the demo dataset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KNL_TRAIN = str(BIN / "knl-train")
HELPERS = ROOT / "tests" / "helpers"


def clean_env():
    """The environment for child processes, as Python sees it.

    Tests that call hvd.init() in-process make Open MPI set OMPI_*/PMIX_* variables with C
    setenv; os.environ never shows them, but a child started with env=None inherits them, and
    an mpirun among them then exits 1 without a word. Passing os.environ explicitly avoids it.
    """
    return dict(os.environ)


def run_cli(*args, timeout=300, env=None, check=False):
    """Run the installed ``knl-train`` console script; returns the CompletedProcess."""
    proc = subprocess.run([KNL_TRAIN, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=clean_env() if env is None else env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"knl-train {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 4-class, 16 px mini-ImageNet of real JPEG files: 480 train, 40 val (made once)."""
    from knl_train.data.demo import DemoSpec, make_demo
    out = tmp_path_factory.mktemp("data") / "tiny"
    make_demo(out, DemoSpec(classes=4, train_per_class=120, val_per_class=10, size=16, seed=3),
              progress=False)
    return out


class BackgroundJob:
    """A job started by ``knl-train launch`` (mpirun) in its own session, read line by line."""

    def __init__(self, *command, np=2):
        import queue
        import threading
        extra = ["--oversubscribe"] if np > len(os.sched_getaffinity(0)) else []
        self.proc = subprocess.Popen([KNL_TRAIN, "launch", "-np", str(np), *extra, "--", *map(str, command)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=clean_env(), cwd=ROOT, start_new_session=True)
        self.lines = []
        self._queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern, timeout=240):
        """Block until a line of output matches ``pattern`` (a regex); returns the match."""
        import queue
        import re
        import time
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matched {pattern!r} in {timeout} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"the job ended before a line matched {pattern!r}:\n{self.output}")
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def wait(self, timeout):
        """The launcher's exit status, once it and its output have ended."""
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return rc

    def ranks(self):
        """{rank: psutil.Process} of the job's rank processes (mpirun's children)."""
        import psutil
        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if "OMPI_COMM_WORLD_RANK" in env:
                out[int(env["OMPI_COMM_WORLD_RANK"])] = child
        return out

    def kill(self):
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


@pytest.fixture()
def background():
    """Start jobs with ``background(*command)``; whatever is left running is killed at the end."""
    jobs = []

    def _start(*command, np=2):
        jobs.append(BackgroundJob(*command, np=np))
        return jobs[-1]
    yield _start
    for job in jobs:
        job.kill()


def write_study_spec(tmp_path, drop=(), **fields) -> Path:
    """A small valid study spec (skx-2s, weak, 1-2 nodes) with ``fields`` on top, as a file."""
    import yaml
    data = {"name": "t", "site": "skx-2s", "nodes": [1, 2], "scaling": "weak",
            "train": {"config": str(ROOT / "jobs" / "train" / "resnet50-synthetic.yaml")}, "steps": 20}
    data.update(fields)
    for key in drop:
        del data[key]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- real Slurm clusters (tests/helpers/slurm_cluster.py; skipped when Slurm is absent) ----
def _slurm_cluster(tmp_path_factory, name, nodes):
    if str(HELPERS) not in sys.path:
        sys.path.insert(0, str(HELPERS))
    from slurm_cluster import SlurmCluster, available
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
