"""What the tests import (``from tests.support import run_cli``): where things are, and how to
run the installed ``knl-train`` the way a user does.

- Paths: ``ROOT`` (the checkout), ``BIN`` (the virtualenv's bin/), ``KNL_TRAIN`` (its console
  script), ``FIXTURES`` (tests/fixtures), ``SCRIPTS`` (tests/support/scripts: the programs tests
  run on real ranks).
- ``clean_env``, ``run_cli``, ``BackgroundJob``: start ``knl-train`` in a subprocess, at once or in
  the background (the ``launch`` and ``background`` fixtures in tests/conftest.py use them);
  ``ok``: it exited 0 without a traceback.
- ``read_jsonl``, ``write_study_spec``, ``write_convergence_spec``: small readers and writers of
  the files runs and studies use.
- Modules beside this one: ``mpi`` (which mpirun this is), ``optim_cases`` (optimizer reference
  inputs), ``schedulers`` (fake sbatch/squeue/qsub/qstat and job scripts that pass the checkers),
  ``slurm_cluster`` (a real Slurm cluster on this host), ``localqueue`` (job scripts for the local
  scheduler's tests).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KNL_TRAIN = str(BIN / "knl-train")
FIXTURES = ROOT / "tests" / "fixtures"
SCRIPTS = ROOT / "tests" / "support" / "scripts"


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


def ok(proc):
    """``proc`` (a CompletedProcess), after checking it exited 0 without a traceback."""
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_study_spec(tmp_path, drop=(), **fields) -> Path:
    """A small valid study spec (skx-2s, weak, 1-2 nodes) with ``fields`` on top, as a file."""
    data = {"name": "t", "site": "skx-2s", "nodes": [1, 2], "scaling": "weak",
            "train": {"config": str(ROOT / "jobs" / "train" / "resnet50-synthetic.yaml")}, "steps": 20}
    return _write_spec(tmp_path, data, drop, fields)


def _write_spec(tmp_path, data: dict, drop, fields) -> Path:
    import yaml
    data = {**data, **fields}
    for key in drop:
        del data[key]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_convergence_spec(tmp_path, drop=(), **fields) -> Path:
    """A small valid convergence study spec (generic-slurm, 1 node x 2 ranks, micro-batch 64,
    batches 256/1024/4096, sgd-goyal and lars with 2 LRs each) with ``fields`` on top, as a file."""
    data = {"name": "cv", "kind": "convergence", "site": "generic-slurm", "nodes": 1, "ranks_per_node": 2,
            "per_rank_batch": 64, "global_batches": [256, 1024, 4096], "epochs": 4,
            "train": {"config": str(ROOT / "jobs" / "train" / "demo.yaml")},
            "optimizers": {"sgd-goyal": {"set": {"optimizer.name": "sgd", "schedule.scaling": "linear"},
                                         "lr": [0.1, 0.2]},
                           "lars": {"set": {"optimizer.name": "lars"}, "lr": [2, 4]}},
            "target_top1": 0.8}
    return _write_spec(tmp_path, data, drop, fields)


class BackgroundJob:
    """A job started by ``knl-train launch`` (mpirun) in its own session, read line by line."""

    def __init__(self, *command, np=2, controller="mpi"):
        extra = ["--oversubscribe"] if np > len(os.sched_getaffinity(0)) else []
        self.proc = subprocess.Popen([KNL_TRAIN, "launch", "-np", str(np), "--controller", controller,
                                      *extra, "--", *map(str, command)],
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
            rank = env.get("OMPI_COMM_WORLD_RANK", env.get("HOROVOD_RANK"))  # mpirun, horovodrun
            if rank is not None and "knl-train" in " ".join(child.cmdline()):
                out[int(rank)] = child
        return out

    def freeze(self):
        """SIGSTOP to mpirun and every process under it (the ranks may sit in process groups of
        their own): the job stops where it stands."""
        self._signal_all(signal.SIGSTOP)

    def kill(self):
        """SIGKILL to mpirun and every process under it: nothing gets to clean up."""
        self._signal_all(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def _signal_all(self, signum):
        import psutil
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                proc.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass
