"""Render a study: one job script per point, the resolved configs and ``manifest.json``.

Templates are Jinja2 (``jobs/templates``, or a directory of the user's own first). Every value
from the spec reaches a script either validated (directive lines) or shell-quoted (commands).
The study directory appears whole or not at all: it is built beside its final name and renamed.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jinja2
import yaml

from knl_train import __version__, resources, yamlconfig
from knl_train.atomic import default_mode
from knl_train.errors import UserError
from knl_train.studies import manifest, schedulers
from knl_train.studies.manifest import JobRecord, Manifest, PointRecord
from knl_train.studies.spec import Point, Study
from knl_train.train.config import TrainConfig

PRESET_FILE = "preset.yaml"
# The job scripts' names, one per backend (a test checks them against the backends, which
# are imported only when used).
SCRIPTS = ("/job.sbatch", "/job.pbs", "/job.sh")


@dataclass(frozen=True)
class Rendered:
    files: Dict[str, str]       # relative path -> text
    manifest: Manifest


def environment(templates: Optional[str] = None) -> jinja2.Environment:
    dirs = [str(Path(templates).resolve())] if templates else []
    if templates and not Path(templates).is_dir():
        raise UserError(f"templates directory {templates} does not exist")
    dirs.append(str(resources.jobs_dir("templates")))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(dirs), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


def render(study: Study, *, command: Optional[str] = None) -> Rendered:
    """Every file of the study directory, as text, and its manifest (nothing written)."""
    spec, site = study.spec, study.site
    backend = schedulers.get(site.scheduler)
    template_name = f"{site.scheduler}.{backend.script_name.split('.')[-1]}.j2"
    env = environment(spec.templates and str(_from_spec(study, spec.templates)))
    try:
        template = env.get_template(template_name)
    except jinja2.TemplateNotFound:
        raise UserError(f"template {template_name} not found in {', '.join(env.loader.searchpath)}") from None
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"template {e.filename or e.name}, line {e.lineno}: {e.message}") from None
    command = command or site.command or _this_knl_train()
    uid = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    base_config = _base_config(study)
    files = {"train.yaml": yaml.safe_dump(base_config, sort_keys=False),
             "study.yaml": yaml.safe_dump(yamlconfig.plain(yamlconfig.to_dict(spec)), sort_keys=False)}
    if study.preset_ref.endswith((".yaml", ".yml")):
        files[PRESET_FILE] = Path(study.preset_ref).read_text(encoding="utf-8")
    points = []
    for p in study.points:
        sets = _point_sets(study, p, base_config)
        token = f"knl-train:{uid}:{p.id}"
        # A convergence point is one training; its repeats are points of their own.
        runs = 1 if spec.kind == "convergence" else spec.repeats
        context = {
            "study": spec, "site": site, "point": p, "scaling": spec.scaling, "repeats": runs,
            "array": spec.array, "token": token, "account": spec.account or site.account,
            "qos": spec.qos or site.qos, "command": command, "preset_name": study.node.preset.name,
            "plan_comments": _plan_comments(study), "exports": _exports(study),
            "launcher": launcher(study, p), "numactl": _numactl(study), "sets": sets,
            "preset_arg": _preset_word(study),
        }
        try:
            text = template.render(**context)
        except jinja2.UndefinedError as e:
            raise UserError(f"template {template_name}: {e.message}; the variables are: "
                            f"{', '.join(sorted(context))}") from None
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"template {e.filename or e.name}, line {e.lineno}: {e.message}") from None
        except jinja2.TemplateError as e:  # e.g. an included template that does not exist
            raise UserError(f"template {template_name}: {e.message or e}") from None
        problems = backend.check(text)
        if problems:
            raise UserError(f"the {site.scheduler} script for {p.id} ({template_name}) is wrong:\n  "
                            + "\n  ".join(problems))
        script = f"{p.directory}/{backend.script_name}"
        files[script] = text
        points.append(_point_record(p, script, token, runs))
    return Rendered(files=files, manifest=_manifest(study, uid, points))


def write(rendered: Rendered, out, *, force: bool = False) -> Path:
    """Write the study directory whole: built under a temporary name, then renamed into place."""
    out = Path(out).resolve()
    old = None
    if out.exists() or out.is_symlink():
        if not (out.is_dir() and (out / manifest.NAME).is_file()):
            raise UserError(f"{out} exists and is not a study directory; choose another --out "
                            "(--force only replaces an earlier rendering)")
        submitted = _submitted_jobs(out)
        if not force:
            raise UserError(f"{out} already exists; choose another --out, or pass --force to replace it"
                            + (f" (it holds {submitted} submitted job(s))" if submitted else ""))
        if submitted:
            raise UserError(f"{out} holds {submitted} submitted job(s); --force will not replace a study "
                            "whose jobs may still run. Render into a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot create the study directory {out}: {e.strerror or e}; "
                        "choose an --out in a directory you can write") from None
    try:
        tmp.chmod(default_mode(directory=True))
        for rel, text in rendered.files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            if rel.endswith(SCRIPTS):
                path.chmod(0o755)
        rendered.manifest.save(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{secrets.token_hex(3)}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def dry_run_text(rendered: Rendered) -> str:
    parts = []
    for rel, text in rendered.files.items():
        if rel.endswith(SCRIPTS):
            parts.append(f"==> {rel} <==\n{text}")
    m = rendered.manifest
    parts.append(f"# {len(m.points)} point(s) for {m.scheduler} ({m.site}); nothing written (--dry-run)")
    return "\n".join(parts)


# ---- pieces ------------------------------------------------------------------------------------
def launcher(study: Study, p: Point) -> str:
    """The launcher's part of the command line, shell-quoted (with $PBS_NODEFILE left to the shell)."""
    from knl_train.tuning import launchers
    site = study.site
    chosen = launchers.get(site.launcher)
    # The script exports the variables first. Open MPI forwards only what -x names: every
    # variable the script exports, and PATH; the other launchers pass the environment on.
    request = launchers.Request(study.node, nodes=p.nodes, exports=dict(_exports(study)), exported=True,
                                forward=("PATH",), srun_mpi=site.srun_mpi,
                                options=site.mpirun_args if site.launcher == "mpirun" else ())
    # PBS names the job's hosts in a file, left to the shell; Slurm tells its launchers itself.
    hosts = chosen.hosts('"$PBS_NODEFILE"') if site.scheduler == "pbs" else []
    return " ".join([*(shlex.quote(a) for a in chosen.command(request)), *hosts])


def _exports(study: Study) -> List[Tuple[str, str]]:
    from knl_train.tuning import launchers
    node, site = study.node, study.site
    out = list(launchers.rank_env(node, _preset_word(study)).replace(progress="lines").to_environ().items())
    # Intel MPI (impi, ibrun) binds by its environment: the script exports the pinning too.
    out += [(k, shlex.quote(v)) for k, v in launchers.get(site.launcher).binding_env(node).items()]
    out += [(k, shlex.quote(v)) for k, v in site.env.items()]
    return out


def _preset_word(study: Study) -> str:
    """The preset as the script names it: a preset file travels with the study, its path found
    at run time."""
    if study.preset_ref.endswith((".yaml", ".yml")):
        return f'"$STUDY_DIR/{PRESET_FILE}"'
    return shlex.quote(study.preset_ref)


def _numactl(study: Study) -> str:
    # knl-train exec applies the same policy; rendering it shows where each rank's memory goes.
    return " ".join(shlex.quote(a) for a in study.node.numactl) + " " if study.node.numactl else ""


def _plan_comments(study: Study) -> List[str]:
    from knl_train.tuning.plan import cpulist
    node = study.node
    lines = [f"local rank {r.local_rank}: CPUs {cpulist(r.cpus)} (compute {cpulist(r.compute_cpus)}"
             f"{', spare ' + cpulist(r.spare_cpus) if r.spare_cpus else ''}), intra-op {r.intra_op}, "
             f"inter-op {r.inter_op}" for r in node.ranks]
    if study.memory_mode:
        lines.append(f"MCDRAM mode: {study.memory_mode}"
                     + (f"; memory policy {' '.join(node.numactl)}" if node.numactl else ""))
    return lines


def _base_config(study: Study) -> dict:
    """The training config every point starts from; batch, length and run_dir come per point."""
    data = yamlconfig.plain(yamlconfig.to_dict(study.train_config))
    for key in ("per_rank_batch", "global_batch", "steps"):
        data[key] = None
    data["run_dir"] = "run"
    src = data.get("data") or {}
    if src.get("format") != "synthetic" and src.get("path") and not os.path.isabs(src["path"]):
        # Jobs start in their point's directory: a relative dataset path means the directory
        # the study was rendered from.
        src["path"] = os.path.abspath(src["path"])
    return data


def _point_sets(study: Study, p: Point, base: dict) -> List[str]:
    every = study.spec.log_every or (1 if study.spec.kind == "scaling" else None)
    sets = [*p.overrides, *((f"log_every={every}",) if every else ())]
    # The point's config must load: catch it here, not in a job hours from now.
    try:
        cfg = yamlconfig.from_dict(TrainConfig, yamlconfig.apply_overrides(base, sets))
    except UserError as e:
        raise UserError(f"point {p.id}: {e}") from None
    try:
        global_batch, _ = cfg.batch_sizes(p.ranks)
    except ValueError as e:
        raise UserError(f"point {p.id}: {e}") from None
    if global_batch != p.global_batch:
        raise UserError(f"point {p.id}: the training config gives global batch {global_batch}, "
                        f"the study {p.global_batch}")
    return sets


def _point_record(p: Point, script: str, token: str, repeats: int) -> PointRecord:
    return PointRecord(id=p.id, nodes=p.nodes, ranks_per_node=p.ranks_per_node, ranks=p.ranks,
                       cores_per_rank=p.cores_per_rank, cpus_per_task=p.cpus_per_task,
                       global_batch=p.global_batch, per_rank_batch=p.per_rank_batch, steps=p.steps,
                       epochs=p.epochs, walltime=p.walltime, queue=p.queue,
                       constraints=tuple(p.constraints), job_name=p.job_name, script=script,
                       run_dirs=tuple(f"{p.directory}/run-{r}" for r in range(repeats)), token=token,
                       job=JobRecord.new(), optimizer=p.optimizer, lr=p.lr, repeat=p.repeat,
                       accumulation=p.accumulation if p.optimizer is not None else None)


def _manifest(study: Study, uid: str, points: List[PointRecord]) -> Manifest:
    spec, site = study.spec, study.site
    return Manifest.new(
        study=spec.name, uid=uid, scheduler=site.scheduler, site=site.name, launcher=site.launcher,
        preset=study.node.preset.name, preset_ref=study.preset_ref, scaling=spec.scaling,
        repeats=spec.repeats, array=spec.array, chain=spec.chain, warmup_steps=spec.warmup_steps,
        images_per_epoch=spec.images_per_epoch, project_epochs=spec.project_epochs,
        memory_mode=study.memory_mode, spec_path=str(study.spec_path), knl_train=__version__,
        notes=tuple(study.notes), points=tuple(points), kind=spec.kind, **_convergence(spec))


def _convergence(spec) -> dict:
    if spec.kind != "convergence":
        return {}
    return {"target_top1": spec.target_top1, "epochs": spec.epochs,
            "reference_batch": spec.reference_batch or spec.global_batches[0]}


def _submitted_jobs(out: Path) -> int:
    try:
        m = Manifest.load(out)
    except UserError as e:
        # Jobs may have been submitted from it: a study we cannot read is never replaced.
        raise UserError(f"{e}; --force replaces only a study whose manifest it can read, "
                        "so that no submitted job loses its record. Render into a new directory") from None
    return sum(1 for p in m.points if p.job is not None and p.job.id)


def _from_spec(study: Study, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else study.spec_path.parent / p


def _this_knl_train() -> str:
    from knl_train.tuning.launch import beside_python
    return beside_python("knl-train") or "knl-train"

