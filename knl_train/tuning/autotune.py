"""``knl-train tune``: measure thread and rank settings on this node, keep the fastest as a preset.

Every trial is a short synthetic training run (``knl_train.autotune.trial``) started through the
launcher with a one-off preset, exactly as a job using the tuned preset would start; the TF
baseline runs with no preset at all (one rank, TF's own thread defaults). Repeats go round-robin
over the candidates being compared, so a slow spell of this (often shared, often virtual) node
hits all of them alike, and each candidate is judged by its median.

The default search is greedy, one dimension at a time from TF's defaults: precision, oneDNN,
ITEX, ranks per node, spare cores, hardware threads per core, intra-op, inter-op, and OpenMP
blocktime (only with ITEX on: only ITEX's OpenMP runtime reads it). A change is kept when its
median beats the incumbent's by more than ``--min-gain``. ``--strategy grid`` measures the
full product instead. Outputs (written atomically into ``--out``): the table (``table.md``),
``results.json``, a bar chart (``tuning.png``) and the best setting as a preset YAML that
``env`` and ``launch`` accept.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from knl_train.errors import UserError
from knl_train.atomic import save_figure_atomic, write_json_atomic, write_text_atomic
from knl_train.runtime import itex as itex_mod
from knl_train.tuning import preset as presets
from knl_train.tuning.plan import kept_spare_cores
from knl_train.tuning.preset import Match, Node, Preset, Settings
from knl_train.autotune.trial import PRECISIONS


STRATEGIES = ("greedy", "grid")
# Greedy order: the biggest, least entangled levers first; blocktime after ITEX (only OpenMP
# reads it). Precision goes last: the stage before it is then the best fp32 setting (the same
# numerics as TF's defaults), and bf16 never meets Eigen's emulated bf16 kernels (oneDNN off:
# 1 image/s for ResNet-50 here).
ORDER = ("onednn", "itex", "ranks", "spare_cores", "threads_per_core", "intra_op", "inter_op",
         "blocktime", "precision")
# KMP_BLOCKTIME that candidates carry until the blocktime dimension changes it (the presets').
START_BLOCKTIME = 1
# Variables that change what a trial measures: a trial sees only what its preset sets.
CONTROLLED_PREFIXES = ("TF_", "OMP_", "KMP_", "KNL_TRAIN_", "HOROVOD_", "ITEX_", "ONEDNN_", "DNNL_",
                       "MKL_", "GOMP_")
KEPT_VARS = ("TF_CPP_MIN_LOG_LEVEL", "ITEX_CPP_MIN_LOG_LEVEL")
# The ISA flags a tuned preset records of its node (the built-in presets list the same kind).
NODE_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512er", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16")
NOISE = re.compile(r"Unable to register cu(DNN|FFT|BLAS) factory|oneDNN custom operations are on|"
                   r"To enable the following instructions|rebuild TensorFlow with|cpu_feature_guard")


# ---- what is searched --------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """What the search needs to know of the node."""
    cores: int                       # physical cores this job may use
    sockets: int = 1
    threads_per_core: int = 1
    itex: str = "absent"             # absent | optional (KNL_TRAIN_ITEX=1) | always (site-packages)
    is_knl: bool = False
    host: str = ""
    cpu: str = ""
    isa: Tuple[str, ...] = ()


def detect_machine(topology=None) -> Machine:
    from knl_train.tuning import topology as topo
    t = topo.detect() if topology is None else topology
    cores = t.cores()
    if not cores:
        raise UserError("this process may use no CPU of the node (empty affinity/cpuset)")
    state = ("always" if itex_mod.site_version() else
             "optional" if itex_mod.side_version() else "absent")
    return Machine(cores=len(cores), sockets=max(1, t.sockets),
                   threads_per_core=max(len(c) for c in cores), itex=state, is_knl=t.is_knl,
                   host=socket.gethostname(), cpu=t.model_name, isa=tuple(t.isa))


@dataclass(frozen=True)
class Workload:
    """The synthetic training run every trial times."""
    model: str = "resnet50"
    image_size: int = 224
    batch: int = 32              # images per node and step, split over the node's ranks
    classes: int = 1000
    warmup: int = 3
    steps: int = 10


@dataclass(frozen=True)
class Space:
    """Values to try per dimension; () = chosen for the machine (see ``resolved``)."""
    precision: Tuple[str, ...] = ("fp32",)
    onednn: Tuple[bool, ...] = (True, False)
    itex: Tuple[bool, ...] = (False, True)
    ranks: Tuple[int, ...] = ()
    spare_cores: Tuple[int, ...] = (0, 1)
    threads_per_core: Tuple[int, ...] = ()
    intra_op: Tuple[int, ...] = (0,)
    inter_op: Tuple[int, ...] = (1, 2)
    blocktime: Tuple[int, ...] = (0, 1, 200)

    def resolved(self, machine: Machine) -> "Space":
        ranks = self.ranks or tuple(sorted({1, 2, 4, machine.sockets, 2 * machine.sockets}))
        tpc = self.threads_per_core or tuple(range(1, machine.threads_per_core + 1))
        return dataclasses.replace(self, ranks=ranks, threads_per_core=tpc)


@dataclass(frozen=True)
class Candidate:
    """One setting. Zeros mean what TF would do: every hardware thread, TF's pool sizes."""
    precision: str = "fp32"
    onednn: bool = True
    itex: bool = False
    ranks: int = 1
    spare_cores: int = 0
    threads_per_core: int = 0
    intra_op: int = 0            # 0: one per compute hardware thread
    inter_op: int = 0            # 0: TF's default (one per CPU of the rank)
    blocktime: int = START_BLOCKTIME
    baseline: bool = False       # TF's defaults: launched with no preset, no settings at all


def baseline(machine: Machine) -> Candidate:
    return Candidate(itex=machine.itex == "always", baseline=True)


@dataclass(frozen=True)
class Effective:
    """A candidate as its ranks run it."""
    precision: str
    onednn: bool
    itex: bool
    ranks: int
    cores_per_rank: int
    spare_cores: int
    threads_per_core: int
    intra_op: int
    inter_op: int
    blocktime: Optional[int]     # None without ITEX: nothing reads it


def effective(c: Candidate, m: Machine) -> Effective:
    cpr = max(1, m.cores // c.ranks)
    tpc = min(c.threads_per_core or m.threads_per_core, m.threads_per_core)
    # The planner keeps spare cores only while they are at most a fifth of the rank's cores.
    spare = kept_spare_cores(c.spare_cores, cpr)
    return Effective(c.precision, c.onednn, c.itex, c.ranks, cpr, spare, tpc,
                     c.intra_op or (cpr - spare) * tpc, c.inter_op or cpr * m.threads_per_core,
                     c.blocktime if c.itex else None)


def infeasible(dim: str, c: Candidate, m: Machine, batch: int) -> Optional[str]:
    """Why ``c`` cannot run here (judged on dimension ``dim``), or None."""
    if dim == "ranks":
        if m.cores % c.ranks:
            return f"{c.ranks} ranks do not divide the {m.cores} cores"
        if batch % c.ranks:
            return f"the batch of {batch} images does not split evenly over {c.ranks} ranks"
    if dim == "threads_per_core" and c.threads_per_core > m.threads_per_core:
        return f"the cores have {m.threads_per_core} hardware thread(s)"
    if dim == "spare_cores" and c.spare_cores and not kept_spare_cores(c.spare_cores, m.cores // c.ranks):
        return (f"{c.spare_cores} spare core(s) exceed a fifth of a rank's {m.cores // c.ranks} "
                "cores, so the planner would not keep them")
    if dim == "itex" and c.itex:
        if m.is_knl:
            return "ITEX's AVX-512 library dies with SIGILL on Xeon Phi"
        if m.itex == "absent":
            return "ITEX is not installed (make env installs it beside the environment)"
    if dim == "itex" and not c.itex and m.itex == "always":
        return "ITEX is installed in site-packages, so it is always on"
    return None


def label(c: Candidate, m: Machine) -> str:
    """What differs, as run, from TF's defaults at the same ranks, e.g. 'bf16, ITEX, 2 ranks'."""
    if c.baseline:
        return "TF defaults" + (" (ITEX always on)" if c.itex else "")
    e = effective(c, m)
    parts = []
    if c.precision != "fp32":
        parts.append("bf16" if c.precision == "mixed_bf16" else c.precision)
    if not c.onednn:
        parts.append("oneDNN off")
    if c.itex and m.itex != "always":
        parts.append("ITEX")
    if c.ranks != 1:
        parts.append(f"{c.ranks} ranks")
    if e.spare_cores:
        parts.append(f"{e.spare_cores} spare core{'s' if e.spare_cores > 1 else ''}")
    if e.threads_per_core != m.threads_per_core:
        parts.append(f"{e.threads_per_core} thread{'s' if e.threads_per_core > 1 else ''}/core")
    if e.intra_op != (e.cores_per_rank - e.spare_cores) * e.threads_per_core:
        parts.append(f"intra-op {e.intra_op}")
    if e.inter_op != e.cores_per_rank * m.threads_per_core:
        parts.append(f"inter-op {e.inter_op}")
    if c.itex and c.blocktime != START_BLOCKTIME:
        parts.append(f"blocktime {c.blocktime}")
    return ", ".join(parts) or "TF defaults as a preset"


# ---- search ------------------------------------------------------------------------------------
# measure(group, dimension) runs the group's repeats and returns every sample so far per
# candidate (one whose trial failed has none). The incumbent comes first.
Measure = Callable[[Sequence[Candidate], str], Mapping[Candidate, Sequence[float]]]


@dataclass(frozen=True)
class Stage:
    dimension: str
    incumbent: Candidate
    candidates: Tuple[Candidate, ...]   # the incumbent first
    chosen: Candidate
    medians: Tuple[Optional[float], ...] = ()   # per candidate, when the stage ended


@dataclass(frozen=True)
class Search:
    stages: Tuple[Stage, ...]
    skipped: Tuple[Tuple[str, str, str], ...]   # (dimension, value, why)
    final: Candidate                             # the greedy path's end (grid: the best)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("-inf")


def _value_text(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def greedy(space: Space, machine: Machine, batch: int, measure: Measure,
           min_gain: float = 0.01) -> Search:
    """Change one dimension at a time, keeping a change only if its median beats the incumbent's
    by more than ``min_gain`` (a fraction)."""
    space = space.resolved(machine)
    incumbent = baseline(machine)
    stages, skipped = [], {}
    for dim in ORDER:
        if dim == "blocktime" and not incumbent.itex:
            continue
        alternatives, seen = [], {effective(incumbent, machine)}
        for value in getattr(space, dim):
            c = dataclasses.replace(incumbent, baseline=False, **{dim: value})
            why = infeasible(dim, c, machine, batch)
            if why:
                skipped[(dim, _value_text(value))] = why
            elif effective(c, machine) not in seen:
                seen.add(effective(c, machine))
                alternatives.append(c)
        if not alternatives:
            continue
        group = (incumbent, *alternatives)
        samples = measure(group, dim)
        best = max(alternatives, key=lambda c: median(samples.get(c, ())))
        if samples.get(best) and (not samples.get(incumbent) or
                                  median(samples[best]) > median(samples[incumbent]) * (1 + min_gain)):
            incumbent = best
        stages.append(Stage(dim, group[0], group, incumbent, _medians(group, samples)))
    return Search(tuple(stages), tuple((d, v, w) for (d, v), w in skipped.items()), incumbent)


def grid_candidates(space: Space, machine: Machine, batch: int):
    """The baseline and every feasible combination (duplicates as run, e.g. blocktime without
    ITEX, dropped); and the skipped values with why."""
    space = space.resolved(machine)
    out, seen, skipped = [baseline(machine)], {effective(baseline(machine), machine)}, {}
    for values in itertools.product(*(getattr(space, d) for d in ORDER)):
        c = Candidate(**dict(zip(ORDER, values)))
        reasons = [(d, infeasible(d, c, machine, batch)) for d in ORDER]
        bad = [(d, w) for d, w in reasons if w]
        for d, w in bad:
            skipped[(d, _value_text(getattr(c, d)))] = w
        if bad or effective(c, machine) in seen:
            continue
        seen.add(effective(c, machine))
        out.append(c)
    return out, tuple((d, v, w) for (d, v), w in skipped.items())


def grid(space: Space, machine: Machine, batch: int, measure: Measure) -> Search:
    candidates, skipped = grid_candidates(space, machine, batch)
    samples = measure(candidates, "grid")
    best = max(candidates, key=lambda c: median(samples.get(c, ())))
    return Search((Stage("grid", candidates[0], tuple(candidates), best,
                         _medians(candidates, samples)),), skipped, best)


def _medians(group, samples) -> Tuple[Optional[float], ...]:
    return tuple(statistics.median(samples[c]) if samples.get(c) else None for c in group)


# ---- running trials ----------------------------------------------------------------------------
class TrialFailed(UserError):
    """A trial exited with an error or ran out of time."""


def trial_env(environ=None) -> Dict[str, str]:
    """The environment trials start from: ours, less every setting a preset would make."""
    environ = dict(os.environ if environ is None else environ)
    out = {k: v for k, v in environ.items()
           if k in KEPT_VARS or not k.startswith(CONTROLLED_PREFIXES)}
    # An ITEX switched on for this shell must not leak into the trials that leave it off.
    side = str(itex_mod.side_dir())
    path = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != side]
    if path:
        out["PYTHONPATH"] = os.pathsep.join(path)
    else:
        out.pop("PYTHONPATH", None)
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return out


def settings_for(c: Candidate, machine: Machine, base: Settings = Settings()) -> Settings:
    """The preset settings that run ``c`` (fields the search does not touch come from ``base``)."""
    e = effective(c, machine)
    return dataclasses.replace(base, spare_cores=c.spare_cores, threads_per_core=e.threads_per_core,
                               intra_op=c.intra_op, inter_op=e.inter_op, kmp_blocktime=c.blocktime,
                               itex=c.itex, onednn=c.onednn)


def _tail(text: str, lines: int = 25) -> str:
    kept = [line for line in text.splitlines() if line.strip() and not NOISE.search(line)]
    return "\n".join(kept[-lines:])


class Runner:
    """Runs trials through the launcher and keeps every sample."""

    def __init__(self, workload: Workload, machine: Machine, work: Path, *, repeats: int,
                 timeout: float, keep_going: bool, base: Settings, progress: bool = True):
        self.workload, self.machine, self.work = workload, machine, Path(work)
        self.repeats, self.timeout, self.keep_going, self.base = repeats, timeout, keep_going, base
        self.samples: Dict[Candidate, List[float]] = {}
        self.failures: Dict[Candidate, str] = {}
        self.trials: List[dict] = []
        self.ids: Dict[Candidate, int] = {}
        self.where: Dict[Candidate, List[str]] = {}
        self.dimension = ""  # of the comparison running
        from tqdm import tqdm
        # A bar on a terminal; in a log, the one line per trial says enough.
        self.bar = tqdm(total=0, unit="trial", desc="tune", file=sys.stderr, dynamic_ncols=True,
                        disable=not (progress and sys.stderr.isatty()))
        self.say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)

    def close(self):
        self.bar.close()

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
                ips = self.run(c, r)
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

    def run(self, c: Candidate, round_: int) -> Optional[float]:
        from knl_train.tuning import launch
        n = len(self.trials)
        out, log = self.work / f"trial-{n:03d}.json", self.work / f"trial-{n:03d}.log"
        out.unlink(missing_ok=True)
        preset_path = self.preset_file(c)
        env = trial_env()
        plan = launch.LaunchPlan(np=c.ranks, command=self.command(c, out),
                                 preset=None if preset_path is None else str(preset_path))
        line = launch.argv(plan, environ=env)
        record = {"trial": n, "candidate": self.id_of(c), "label": label(c, self.machine),
                  "round": round_, "dimension": self.dimension, "command": launch.render(line),
                  "log": str(log)}
        t0 = time.perf_counter()
        code = _run_logged(line, env, self.timeout, log)
        record["wall_seconds"] = round(time.perf_counter() - t0, 1)
        error = None
        if code is None:
            error = f"timed out after {self.timeout:g} s"
        elif code != 0:
            error = f"exited with code {code}"
        elif not out.exists():
            error = "exited without writing its result"
        if error:
            record["error"] = error
            self.trials.append(record)
            message = (f"trial {n} ({label(c, self.machine)}) {error}.\n"
                       f"command: {record['command']}\nlast lines of its output ({log}):\n"
                       f"{_tail(log.read_text(errors='replace')) or '(nothing)'}")
            if not self.keep_going:
                raise TrialFailed(message + "\n(--keep-going records a failing candidate and "
                                  "carries on without it)")
            self.failures[c] = error
            self.say(f"tune: {message}\ntune: carrying on without this candidate")
            return None
        result = json.loads(out.read_text())
        ips = float(result["images_per_sec"])
        record.update(images_per_sec=ips, median_step_seconds=result.get("median_step_seconds"),
                      threads=result.get("threads"), itex=result.get("itex"),
                      onednn=result.get("onednn"), mixed_policy=result.get("mixed_policy"))
        self.trials.append(record)
        self.samples.setdefault(c, []).append(ips)
        self.say(f"tune: trial {n} ({self.dimension}, round {round_ + 1}/{self.repeats}): "
                 f"{label(c, self.machine):36s} {ips:9.2f} images/s")
        return ips


def _run_logged(line: Sequence[str], env, timeout: float, log: Path) -> Optional[int]:
    """Run ``line`` with its output in ``log``; the exit code, or None on timeout."""
    with open(log, "w") as f:
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


# ---- summaries and outputs ---------------------------------------------------------------------
def spread(samples: Sequence[float]) -> dict:
    s = sorted(samples)
    q1, q3 = (statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) > 1 else (s[0], s[0]))
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q1, "q3": q3,
            "samples": list(samples)}


def summarize(runner: Runner, machine: Machine) -> List[dict]:
    """One row per candidate measured, fastest first."""
    base = baseline(machine)
    base_median = median(runner.samples.get(base, ()))
    rows = []
    for c, i in runner.ids.items():
        s = runner.samples.get(c, [])
        e = effective(c, machine)
        row = {"id": i, "label": label(c, machine), "baseline": c.baseline,
               "candidate": dataclasses.asdict(c), "ranks": c.ranks,
               "threads_per_rank": e.intra_op, "inter_op": e.inter_op,
               "precision": c.precision, "stages": runner.where.get(c, []),
               "settings": None if c.baseline else
               dataclasses.asdict(settings_for(c, machine, runner.base))}
        if s:
            row.update(spread(s))
            row["speedup"] = (row["median"] / base_median) if base_median > 0 else None
        else:
            row["failed"] = runner.failures.get(c, "not measured")
        rows.append(row)
    rows.sort(key=lambda r: -r.get("median", float("-inf")))
    return rows


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(record: dict) -> str:
    w, m = record["workload"], record["machine"]
    best = record["best"]
    lines = [f"# knl-train tune: {w['model']} at {w['image_size']} px on {m['host']}", "",
             f"{m['cpu']}, {m['cores']} cores x {m['threads_per_core']} thread(s) in "
             f"{m['sockets']} socket(s); {record['date']}.", "",
             f"Batch {w['batch']} images per node per step (split over the ranks), "
             f"{w['warmup']} warm-up steps left out, {w['steps']} timed; "
             f"{record['strategy']} search, {record['repeats']} interleaved repeats per "
             f"comparison; images/s median (min-max over repeats).", "",
             "| # | setting | ranks x threads | inter-op | images/s | min-max | IQR | n "
             "| vs TF defaults |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["candidates"]:
        name = r["label"] + (" **(best)**" if r["id"] == best.get("id") else "")
        if "median" not in r:
            lines.append(f"| {r['id']} | {name} | {r['ranks']} x {r['threads_per_rank']} | "
                         f"{r['inter_op']} | failed: {r['failed']} | | | 0 | |")
            continue
        lines.append(f"| {r['id']} | {name} | {r['ranks']} x {r['threads_per_rank']} | "
                     f"{r['inter_op']} | {r['median']:.2f} | {r['min']:.1f}-{r['max']:.1f} | "
                     f"{r['q1']:.1f}-{r['q3']:.1f} | {len(r['samples'])} | "
                     f"{_f(r.get('speedup'), 2)}x |")
    lines += ["", f"**Best: {best.get('label', '-')}**: {_f(best.get('images_per_sec'), 2)} images/s, "
              f"{_f(record.get('speedup'), 2)}x TF's defaults "
              f"({_f(record.get('baseline_images_per_sec'), 2)} images/s). "
              f"Preset: `{record['files']['preset']}`."]
    if record["stages"] and record["strategy"] == "greedy":
        lines += ["", "## Search (medians when each stage ended)", ""]
        for s in record["stages"]:
            rivals = ", ".join(f"{name} {_f(ips)}" for name, ips in s["compared"][1:])
            name, ips = s["compared"][0]
            verdict = f"changed to {s['chosen']}" if s["changed"] else "kept the incumbent"
            lines.append(f"- {s['dimension']}: incumbent {name} {_f(ips)} against {rivals}: "
                         f"{verdict}")
    if record["skipped"]:
        lines += ["", "## Not tried", ""]
        lines += [f"- {d} {v}: {why}" for d, v, why in record["skipped"]]
    if record["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


def chart(record: dict, path: Path) -> None:
    """Images/s per candidate with min-max error bars; the TF baseline as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in record["candidates"] if "median" in r][::-1]   # fastest on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.42 * max(1, len(rows))))
    y = range(len(rows))
    med = [r["median"] for r in rows]
    err = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
    colors = ["tab:orange" if r["id"] == record["best"].get("id") else
              "tab:gray" if r["baseline"] else "tab:blue" for r in rows]
    ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
    ax.set_yticks(list(y), [f"{r['label']} ({r['ranks']}x{r['threads_per_rank']})" for r in rows],
                  fontsize=8)
    base = record.get("baseline_images_per_sec")
    xlabel = "images/s: median of repeats, whiskers min-max"
    if base:
        ax.axvline(base, color="black", linestyle="--", linewidth=1)
        xlabel += f"; dashed: TF defaults ({base:.1f})"
    w = record["workload"]
    ax.set_xlabel(xlabel)
    ax.set_title(f"{w['model']} {w['image_size']} px, batch {w['batch']}/node on "
                 f"{record['machine']['host']}", fontsize=10)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def preset_name(host: str) -> str:
    return "tuned-" + (re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-") or "node")


def tuned_preset(name: str, best: Candidate, row: dict, record: dict, machine: Machine,
                 base: Settings, topology=None) -> Preset:
    w = record["workload"]
    measured = {"images_per_sec": round(row["median"], 2),
                "spread": [round(row["min"], 2), round(row["max"], 2)],
                "baseline": _round(record.get("baseline_images_per_sec")),
                "speedup": _round(record.get("speedup"), 3), "precision": best.precision,
                "model": w["model"], "image_size": w["image_size"], "batch": w["batch"],
                "repeats": len(row["samples"]), "date": record["date"], "host": machine.host,
                "cpu": machine.cpu}
    notes = [f"measured by knl-train tune: {label(best, machine)}, {row['median']:.1f} images/s, "
             f"{_f(record.get('speedup'), 2)}x TF's defaults ({w['model']}, {w['image_size']} px, "
             f"batch {w['batch']} per node)"]
    if best.precision != "fp32":
        notes.append(f"the speed was measured in {best.precision}, which a preset cannot set: "
                     f"put 'precision: {best.precision}' in the training config (it changes numerics)")
    if best.baseline:
        notes.append("TF's defaults were fastest: this preset approximates them (one rank, "
                     "every hardware thread, no ITEX)")
    node = None
    if topology is not None:
        node = Node(model_name=topology.model_name, vendor=topology.vendor,
                    flags=tuple(f for f in NODE_FLAGS if f in topology.flags),
                    sockets=topology.sockets, cores_per_socket=topology.cores_per_socket,
                    threads_per_core=topology.threads_per_core)
    # The CPU it was measured on: used elsewhere, it warns (tuned presets are never auto-chosen).
    match = Match(vendor=topology.vendor, flags=node.flags) if topology is not None else Match()
    return Preset(name=name, title=f"tuned on {machine.host} ({machine.cpu})", match=match,
                  node=node, ranks_per_node=best.ranks,
                  settings=settings_for(dataclasses.replace(best, baseline=False), machine, base),
                  sources=(f"knl-train tune, {record['date']}: results.json beside this file",),
                  notes=tuple(notes), measured=measured)


def _round(x, digits=2):
    return None if x is None else round(x, digits)


# ---- the command -------------------------------------------------------------------------------
BOOL_WORDS = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False,
              "yes": True, "no": False}
# option -> (dimension, kind, minimum)
LIST_OPTIONS = {
    "--precision": ("precision", "precision", None),
    "--onednn": ("onednn", "bool", None),
    "--itex": ("itex", "bool", None),
    "--ranks": ("ranks", "int", 1),
    "--spare-cores": ("spare_cores", "int", 0),
    "--threads-per-core": ("threads_per_core", "int", 1),
    "--intra-op": ("intra_op", "int", 0),
    "--inter-op": ("inter_op", "int", 1),
    "--blocktime": ("blocktime", "int", 0),
}


def parse_list(option: str, text: str) -> tuple:
    """'1,2' -> (1, 2) for ``option``; a UserError naming the option and the bad item."""
    _, kind, minimum = LIST_OPTIONS[option]
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise UserError(f"{option} {text!r}: give a comma-separated list without empty items, "
                        "e.g. 1,2")
    out = []
    for item in items:
        if kind == "bool":
            if item.lower() not in BOOL_WORDS:
                raise UserError(f"{option}: {item!r} is not on or off; e.g. {option} on,off")
            value = BOOL_WORDS[item.lower()]
        elif kind == "precision":
            if item not in PRECISIONS:
                raise UserError(f"{option}: unknown precision {item!r}; choose from "
                                f"{', '.join(PRECISIONS)}, e.g. {option} fp32,mixed_bf16")
            value = item
        else:
            try:
                value = int(item)
            except ValueError:
                raise UserError(f"{option}: {item!r} is not a whole number; e.g. {option} 1,2") from None
            if value < minimum:
                raise UserError(f"{option}: {value} is too small (at least {minimum})")
        if value not in out:
            out.append(value)
    return tuple(out)


def add_arguments(p) -> None:
    """The options of ``knl-train tune``."""
    g = p.add_argument_group("workload (a short synthetic training run per trial)")
    g.add_argument("--model", default="resnet50", help="model from the registry (default resnet50)")
    g.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    g.add_argument("--batch", type=int, default=32,
                   help="images per node per step, split over the node's ranks (default 32)")
    g.add_argument("--classes", type=int, default=1000, help="classifier width (default 1000)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per trial (default 3)")
    g.add_argument("--steps", type=int, default=10, help="timed steps per trial (default 10)")
    s = p.add_argument_group("search space (comma-separated values to try; TF's defaults are "
                             "always measured as the baseline)")
    s.add_argument("--precision", default="fp32",
                   help="fp32 and/or mixed_bf16 (default fp32: bf16 changes numerics)")
    s.add_argument("--onednn", default="on,off", help="TF's oneDNN kernels (default on,off)")
    s.add_argument("--itex", default="off,on", help="Intel Extension for TensorFlow (default off,on)")
    s.add_argument("--ranks", default="", help="ranks per node (default 1,2,4 and 1-2 per socket, "
                                               "those that divide the cores)")
    s.add_argument("--spare-cores", default="0,1",
                   help="cores per rank left to Horovod and tf.data (default 0,1)")
    s.add_argument("--threads-per-core", default="",
                   help="hardware threads per core to compute on (default 1 to the node's)")
    s.add_argument("--intra-op", default="0",
                   help="TF intra-op threads per rank; 0 = one per compute thread (default 0)")
    s.add_argument("--inter-op", default="1,2", help="TF inter-op threads (default 1,2)")
    s.add_argument("--blocktime", default="0,1,200",
                   help="KMP_BLOCKTIME in ms, tried only with ITEX on (default 0,1,200)")
    r = p.add_argument_group("search")
    r.add_argument("--strategy", choices=STRATEGIES, default="greedy",
                   help="greedy: one dimension at a time from TF's defaults (default); "
                        "grid: every combination")
    r.add_argument("--repeats", type=int, default=3,
                   help="trials per candidate per comparison, interleaved (default 3)")
    r.add_argument("--min-gain", type=float, default=1.0,
                   help="percent a change must gain over the incumbent's median (default 1)")
    r.add_argument("--timeout", type=float, default=900, help="seconds per trial (default 900)")
    r.add_argument("--keep-going", action="store_true",
                   help="carry on without a candidate whose trial fails (default: stop)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="", help="output directory (default tune-<host>)")
    o.add_argument("--name", default="", help="preset name (default tuned-<host>)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--dry-run", action="store_true",
                   help="print the space and what would be run, run nothing")


def space_from_args(args) -> Space:
    values = {}
    for option, (dim, _, _) in LIST_OPTIONS.items():
        text = getattr(args, option.lstrip("-").replace("-", "_"))
        if text not in ("", None):
            values[dim] = parse_list(option, text)
    return Space(**values)


def workload_from_args(args) -> Workload:
    for name in ("image_size", "batch", "classes", "warmup", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 32 and args.model.startswith("resnet50"):
        raise UserError(f"--image-size {args.image_size}: {args.model} needs at least 32 px")
    if args.min_gain < 0:
        raise UserError(f"--min-gain must be >= 0 (percent), got {args.min_gain:g}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    return Workload(model=args.model, image_size=args.image_size, batch=args.batch,
                    classes=args.classes, warmup=args.warmup, steps=args.steps)


def _check_model(name: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the registry imports TF
    from knl_train.models.registry import MODELS
    import knl_train.models  # noqa: F401  (registers the models)
    if name not in MODELS:
        raise UserError(f"--model {name!r} is not in the registry; available: "
                        f"{', '.join(sorted(MODELS))}")


def run(args, *, topology=None, echo: bool = True) -> dict:
    """Parse, search, write (and print the table if ``echo``); the results record."""
    workload = workload_from_args(args)
    space = space_from_args(args)
    _check_model(workload.model)
    if topology is None:
        from knl_train.tuning import topology as topo
        topology = topo.detect()
    machine = detect_machine(topology)
    detected = presets.detect(topology)
    out = Path(args.out or f"tune-{preset_name(machine.host)[len('tuned-'):]}")
    name = args.name or preset_name(machine.host)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (it names a file)")

    rspace = space.resolved(machine)
    say = lambda msg: print(f"tune: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"{topology.describe()}")
    say(f"{workload.model} at {workload.image_size} px, batch {workload.batch} per node, "
        f"{workload.warmup} warm-up + {workload.steps} timed steps per trial; {args.strategy} "
        f"search, {args.repeats} repeats")
    for dim in ORDER:
        say(f"  {dim}: {', '.join(_value_text(v) for v in getattr(rspace, dim))}")
    if args.dry_run:
        if args.strategy == "grid":
            cands, skipped = grid_candidates(space, machine, workload.batch)
            say(f"grid: {len(cands)} candidates x {args.repeats} repeats = "
                f"{len(cands) * args.repeats} trials")
            for c in cands:
                print(label(c, machine))
        else:
            say("greedy: one stage per dimension with more than one feasible value, in the "
                "order above; each stage runs the incumbent and its alternatives")
        return {}

    out.mkdir(parents=True, exist_ok=True)
    work = out / "trials"
    work.mkdir(exist_ok=True)
    for old in itertools.chain(work.glob("trial-*"), work.glob("candidate-*.yaml")):
        old.unlink()  # an earlier run's: their numbering would mix with ours
    base = detected.settings
    runner = Runner(workload, machine, work, repeats=args.repeats, timeout=args.timeout,
                    keep_going=args.keep_going, base=base, progress=not args.quiet)
    t0 = time.perf_counter()
    try:
        if args.strategy == "grid":
            search = grid(space, machine, workload.batch, runner.measure)
        else:
            search = greedy(space, machine, workload.batch, runner.measure, args.min_gain / 100)
    finally:
        runner.close()
    return finish(args, search, runner, rspace, machine, workload, out, name, detected, topology,
                  time.perf_counter() - t0, echo)


def finish(args, search, runner, space, machine, workload, out, name, detected, topology,
           seconds, echo=True) -> dict:
    """The table, results JSON, chart and tuned preset, from the finished search."""
    rows = summarize(runner, machine)
    measured = [r for r in rows if "median" in r]
    if not measured:
        raise UserError(f"no trial succeeded; see the logs in {out / 'trials'}")
    # The search's end point: greedy kept only changes that beat their incumbent side by side
    # (by --min-gain), so the highest median of all rows could be one it rightly rejected.
    best = search.final if search.final in runner.samples else None
    best_row = (next(r for r in measured if r["id"] == runner.ids[best]) if best is not None
                else measured[0])
    best = {i: c for c, i in runner.ids.items()}[best_row["id"]]
    base_samples = runner.samples.get(baseline(machine))
    base_median = statistics.median(base_samples) if base_samples else None
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    notes = []
    if best.precision != "fp32":
        notes.append(f"The best setting trains in {best.precision}: set 'precision: "
                     f"{best.precision}' in the training config to get this speed (bf16 changes "
                     "numerics; the preset cannot carry precision).")
    if base_median is None:
        notes.append("The TF-default baseline did not run, so there is no speed-up.")
    notes.append(f"Settings the search does not change (fusion buffer, cycle time, memory policy, "
                 f"affinity style, data threads) come from the detected preset {detected.name}.")
    record = {
        "date": date, "seconds": round(seconds, 1), "strategy": args.strategy,
        "repeats": args.repeats, "min_gain_pct": args.min_gain,
        "machine": {**dataclasses.asdict(machine), "topology": topology.describe()},
        "workload": dataclasses.asdict(workload),
        "space": {d: list(getattr(space, d)) for d in ORDER},
        "baseline_images_per_sec": base_median,
        "best": {"id": best_row["id"], "label": best_row["label"], "images_per_sec": best_row["median"],
                 "precision": best.precision, "ranks": best.ranks},
        "speedup": (best_row["median"] / base_median) if base_median else None,
        "candidates": rows,
        "stages": [{"dimension": s.dimension,
                    "compared": [(label(c, machine), m) for c, m in zip(s.candidates, s.medians)],
                    "incumbent": label(s.incumbent, machine), "chosen": label(s.chosen, machine),
                    "changed": s.chosen != s.incumbent} for s in search.stages],
        "search_end": label(search.final, machine),
        "skipped": [list(x) for x in search.skipped],
        "trials": runner.trials, "notes": notes,
    }
    preset_path = out / f"{name}.yaml"
    record["files"] = {"preset": str(preset_path), "results": str(out / "results.json"),
                       "table": str(out / "table.md"), "chart": str(out / "tuning.png")}
    tuned = tuned_preset(name, best, best_row, record, machine, runner.base, topology)
    presets.dump(tuned, preset_path)
    write_json_atomic(out / "results.json", record)
    text = markdown(record)
    write_text_atomic(out / "table.md", text)
    chart(record, out / "tuning.png")
    if echo:
        print(text)
    print(f"wrote {preset_path}, {out / 'results.json'}, {out / 'table.md'} and "
          f"{out / 'tuning.png'}; on one node: knl-train launch -np {best.ranks} --preset "
          f"{preset_path} -- knl-train train --config CONFIG"
          + (f" --set precision={best.precision}" if best.precision != "fp32" else ""))
    return record


def main(args) -> int:
    run(args)
    return 0
