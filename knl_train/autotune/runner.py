"""Running trials: each candidate's preset file, its launcher line, the subprocess (in a session of
its own, ended whole on a timeout) and the samples it returns."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from tqdm import tqdm

import knl_train.log
from knl_train.autotune.space import Candidate, Machine, Workload, label, settings_for
from knl_train.errors import UserError
from knl_train.runtime import itex, rankenv
from knl_train.tuning import launch
from knl_train.tuning import preset as presets
from knl_train.tuning.preset import Preset, Settings

log = knl_train.log.get(__name__)

# Variables that change what a trial measures: a trial sees only what its preset sets. The
# prefixes cover every RankEnv variable's family and the libraries' own; the variables
# themselves are listed too, so that one RankEnv gains later is dropped whatever its name.
CONTROLLED_PREFIXES = ("TF_", "OMP_", "KMP_", rankenv.VAR_PREFIX, "HOROVOD_", "ITEX_", "ONEDNN_",
                       "DNNL_", "MKL_", "GOMP_")
CONTROLLED_VARS = (*(var for _, var, _ in rankenv.field_docs()), *rankenv.LAUNCH_VARS,
                   *rankenv.THREADING_VARS)
KEPT_VARS = ("TF_CPP_MIN_LOG_LEVEL", "ITEX_CPP_MIN_LOG_LEVEL")
NOISE = re.compile(r"Unable to register cu(DNN|FFT|BLAS) factory|oneDNN custom operations are on|"
                   r"To enable the following instructions|rebuild TensorFlow with|cpu_feature_guard")


class TrialFailed(UserError):
    """A trial exited with an error or ran out of time."""


def trial_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment trials start from: ours, less every setting a preset would make."""
    environ = dict(os.environ if environ is None else environ)
    out = {k: v for k, v in environ.items()
           if k in KEPT_VARS or not (k in CONTROLLED_VARS or k.startswith(CONTROLLED_PREFIXES))}
    # An ITEX switched on for this shell must not leak into the trials that leave it off.
    side = str(itex.side_dir())
    path = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != side]
    if path:
        out["PYTHONPATH"] = os.pathsep.join(path)
    else:
        out.pop("PYTHONPATH", None)
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return out


@dataclass(frozen=True)
class Trial:
    """One trial as ``results.json`` records it: what ran, and its result or its error."""
    trial: int
    candidate: int
    label: str
    round: int
    dimension: str
    command: str
    log: str
    wall_seconds: float
    error: Optional[str] = None
    # from the trial's JSON (rank 0's), when it succeeded
    images_per_sec: Optional[float] = None
    median_step_seconds: Optional[float] = None
    threads: Optional[dict] = None
    itex: Optional[bool] = None
    onednn: Optional[bool] = None
    mixed_policy: Optional[str] = None

    def to_dict(self) -> dict:
        names = [f.name for f in dataclasses.fields(self)]
        cut = names.index("error")
        out = {n: getattr(self, n) for n in names[:cut]}
        if self.error is not None:
            out["error"] = self.error
        else:
            out.update({n: getattr(self, n) for n in names[cut + 1:]})
        return out


def _tail(text: str, lines: int = 25) -> str:
    kept = [line for line in text.splitlines() if line.strip() and not NOISE.search(line)]
    return "\n".join(kept[-lines:])


class Runner:
    """Runs trials through the launcher and keeps every sample."""

    def __init__(self, workload: Workload, machine: Machine, work: Path, *, repeats: int,
                 timeout: float, keep_going: bool, base: Settings, progress: bool = True):
        self.workload, self.machine, self.work = workload, machine, Path(work)
        self.repeats, self.timeout, self.keep_going, self.base = repeats, timeout, keep_going, base
        self.progress = progress
        self.samples: Dict[Candidate, List[float]] = {}
        self.failures: Dict[Candidate, str] = {}
        self.trials: List[Trial] = []
        self.ids: Dict[Candidate, int] = {}
        self.where: Dict[Candidate, List[str]] = {}
        self.dimension = ""  # of the comparison running
        # A bar on a terminal; in a log, the one line per trial says enough.
        self.bar = tqdm(total=0, unit="trial", desc="tune", file=sys.stderr, dynamic_ncols=True,
                        disable=not (progress and sys.stderr.isatty()))

    def close(self):
        self.bar.close()

    def say(self, msg: str) -> None:
        """A progress line (none with progress off), written around the bar."""
        if self.progress:
            with tqdm.external_write_mode(file=sys.stderr):
                log.info(msg)

    def id_of(self, c: Candidate) -> int:
        return self.ids.setdefault(c, len(self.ids))

    def measure(self, group: Sequence[Candidate], dimension: str) -> Dict[Candidate, List[float]]:
        """``repeats`` rounds over ``group``, each round starting one candidate later; this stage's
        samples only, so every comparison is between interleaved runs."""
        self.dimension = dimension
        group = [c for c in group if c not in self.failures]
        for c in group:
            self.id_of(c)
            self.where.setdefault(c, []).append(self.dimension)
        self.bar.total += self.repeats * len(group)
        self.bar.refresh()
        stage: Dict[Candidate, List[float]] = {c: [] for c in group}
        for r in range(self.repeats):
            for c in group[r % len(group):] + group[:r % len(group)]:
                if c in self.failures:
                    self.bar.update(1)
                    continue
                self.bar.set_postfix_str(f"{self.dimension}: {label(c, self.machine)}"[:60])
                ips = self.run_trial(c, r)
                if ips is not None:
                    stage[c].append(ips)
                self.bar.update(1)
        return stage

    def command(self, c: Candidate, out: Path) -> Tuple[str, ...]:
        w = self.workload
        return (sys.executable, "-m", "knl_train.autotune.trial", "--model", w.model,
                "--image-size", str(w.image_size), "--batch", str(w.batch // c.ranks),
                "--classes", str(w.classes), "--warmup", str(w.warmup), "--steps", str(w.steps),
                "--precision", c.precision, "--out", str(out))

    def preset_file(self, c: Candidate) -> Optional[Path]:
        if c.baseline:
            return None
        path = self.work / f"candidate-{self.id_of(c):02d}.yaml"
        if not path.exists():
            presets.dump(Preset(name=path.stem, title=label(c, self.machine), ranks_per_node=c.ranks,
                                settings=settings_for(c, self.machine, self.base)), path)
        return path

    def run_trial(self, c: Candidate, round_: int) -> Optional[float]:
        """Run ``c`` once; its images/s, or None if it failed and ``keep_going`` carries on."""
        n = len(self.trials)
        out, log_path = self.work / f"trial-{n:03d}.json", self.work / f"trial-{n:03d}.log"
        out.unlink(missing_ok=True)
        preset_path = self.preset_file(c)
        env = trial_env()
        plan = launch.LaunchPlan(np=c.ranks, command=self.command(c, out),
                                 preset=None if preset_path is None else str(preset_path))
        line = launch.argv(plan, environ=env)
        t0 = time.perf_counter()
        code = _run_logged(line, env, self.timeout, log_path)
        ran = dict(trial=n, candidate=self.id_of(c), label=label(c, self.machine), round=round_,
                   dimension=self.dimension, command=launch.render(line), log=str(log_path),
                   wall_seconds=round(time.perf_counter() - t0, 1))
        error = _error(code, self.timeout, out)
        if error:
            self.trials.append(Trial(**ran, error=error))
            self._failed(c, n, error, ran["command"], log_path)
            return None
        result = json.loads(out.read_text())
        ips = float(result["images_per_sec"])
        self.trials.append(Trial(**ran, images_per_sec=ips,
                                 median_step_seconds=result.get("median_step_seconds"),
                                 threads=result.get("threads"), itex=result.get("itex"),
                                 onednn=result.get("onednn"), mixed_policy=result.get("mixed_policy")))
        self.samples.setdefault(c, []).append(ips)
        self.say(f"trial {n} ({self.dimension}, round {round_ + 1}/{self.repeats}): "
                 f"{label(c, self.machine):36s} {ips:9.2f} images/s")
        return ips

    def _failed(self, c: Candidate, n: int, error: str, command: str, log_path: Path) -> None:
        """Stop with the trial's output (``TrialFailed``), or with ``keep_going`` drop ``c``."""
        message = (f"trial {n} ({label(c, self.machine)}) {error}.\n"
                   f"command: {command}\nlast lines of its output ({log_path}):\n"
                   f"{_tail(log_path.read_text(errors='replace')) or '(nothing)'}")
        if not self.keep_going:
            raise TrialFailed(message + "\n(--keep-going records a failing candidate and "
                              "carries on without it)")
        self.failures[c] = error
        self.say(message)
        self.say("carrying on without this candidate")


def _error(code: Optional[int], timeout: float, out: Path) -> Optional[str]:
    """Why a trial that ended with ``code`` (None: timed out) failed, or None."""
    if code is None:
        return f"timed out after {timeout:g} s"
    if code != 0:
        return f"exited with code {code}"
    if not out.exists():
        return "exited without writing its result"
    return None


def _run_logged(line: Sequence[str], env, timeout: float, log_path: Path) -> Optional[int]:
    """Run ``line`` with its output in ``log_path``; the exit code, or None on timeout."""
    with open(log_path, "w") as f:
        # Its own session, so that a timeout ends mpirun and its ranks together.
        proc = subprocess.Popen(list(line), stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(proc)
            return None
        except BaseException:
            _end(proc)
            raise


def _end(proc: subprocess.Popen) -> None:
    """End mpirun and its ranks: they have process groups of their own, but share its session.

    On SIGTERM mpirun waits out its SIGKILL grace (20 s) before it exits, even once its ranks are
    gone, so every process of the session gets SIGTERM, and what is left SIGKILL soon after.
    """
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in _session(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace)
            if not _session(proc.pid):
                return
        except subprocess.TimeoutExpired:
            continue


def _session(sid: int) -> List[int]:
    """Live processes of session ``sid`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state, ppid, pgrp, session, ...; a zombie is already gone
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids
