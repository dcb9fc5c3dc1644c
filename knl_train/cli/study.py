"""``knl-train study``: render, submit, status, collect, report and check scaling and convergence
studies."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from knl_train import log as knl_log
from knl_train.errors import UserError

log = knl_log.get(__name__)


def cmd_study_render(args) -> int:
    from knl_train import studies
    if not args.out and not args.dry_run:
        raise UserError("study render needs --out DIR (the study directory to create), or --dry-run")
    study = studies.spec.load(args.spec, templates=args.templates)
    rendered = studies.render.render(study)
    for note in study.notes:
        log.warning(note)
    if args.dry_run:
        print(studies.render.dry_run_text(rendered))
        return 0
    out = studies.render.write(rendered, args.out, force=args.force)
    m = rendered.manifest
    spec = study.spec
    shape = (f"{m.points[0].nodes}-{m.points[-1].nodes} nodes" if spec.kind == "scaling" else
             f"{len(spec.optimizers)} optimizer(s) x {len(spec.global_batches)} global batches x their "
             f"LRs x {spec.repeats} repeat(s) on {m.points[0].nodes} node(s)")
    print(f"wrote {len(m.points)} {m.scheduler} script(s) for {study.site.name} to {out} "
          f"({shape}, {study.node.ranks_per_node} ranks/node, preset {study.node.preset.name}); "
          f"next: knl-train study submit {out}")
    return 0


def cmd_study_submit(args) -> int:
    from knl_train import studies
    jobs = studies.jobs.submit(args.dir, attempts=args.attempts, base_delay=args.retry_delay,
                               retry_failed=args.retry_failed, echo=functools.partial(print, flush=True))
    new = sum(1 for j in jobs if j.new)
    print(f"{new} job(s) submitted, {len(jobs) - new} already submitted; follow them with "
          f"knl-train study status {args.dir}")
    return 0


def cmd_study_status(args) -> int:
    from knl_train import studies
    if args.wait:
        rows = studies.jobs.wait(args.dir, timeout=args.timeout,
                                 on_change=lambda r: print(studies.jobs.status_text(r) + "\n", flush=True))
    else:
        rows = studies.jobs.status(args.dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    elif not args.wait:
        print(studies.jobs.status_text(rows))
    return 1 if args.wait and any(r.failed for r in rows) else 0


def cmd_study_collect(args) -> int:
    from knl_train import studies
    results = studies.report.collect(args.dir)
    if results.get("kind") == "convergence":
        have = sum(p["status"] == "ok" for p in results["points"])
        without = len(results["points"]) - have
    else:
        have, without = len(studies.report.table(results)), len(studies.report.missing(results))
    print(f"{have} point(s) with data, {without} without; "
          f"wrote {os.path.join(args.dir, studies.report.RESULTS)}")
    return 0


def cmd_study_report(args) -> int:
    from knl_train import studies
    paths = studies.report.report(args.dir)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for k, p in paths.items() if k != "results"))
    return 0


def cmd_study_check(args) -> int:
    from knl_train import studies
    bad = 0
    for path in args.scripts:
        kind, problems = studies.schedulers.check_script(path, args.scheduler)
        for p in problems:
            print(f"{path}: {p}")
        if not problems:
            print(f"{path}: ok ({kind})")
        bad += bool(problems)
    return 1 if bad else 0


def add_parsers(sub) -> None:
    st = sub.add_parser("study", help="scaling and convergence studies on Slurm, PBS or this node: "
                                        "render, submit, status, collect, report")
    ssub = st.add_subparsers(dest="study_command", metavar="STUDY_COMMAND", required=True)
    sr = ssub.add_parser("render", help="write one job script per point and manifest.json")
    sr.add_argument("spec", help="study spec (YAML); examples in jobs/studies/")
    sr.add_argument("--out", help="the study directory to create")
    sr.add_argument("--dry-run", action="store_true", help="print the scripts, write nothing")
    sr.add_argument("--templates", help="a directory of templates that take precedence over the shipped ones")
    sr.add_argument("--force", action="store_true", help="replace --out if no job of it was submitted")
    sr.set_defaults(fn=cmd_study_render)
    ss = ssub.add_parser("submit", help="submit every point not yet submitted (sbatch / qsub)")
    ss.add_argument("dir", help="study directory")
    ss.add_argument("--attempts", type=int, default=5, help="tries per job on transient scheduler errors")
    ss.add_argument("--retry-delay", type=float, default=2.0,
                    help="first backoff in seconds (doubles per retry, at most 60)")
    ss.add_argument("--retry-failed", action="store_true",
                    help="also submit again the points whose job failed, timed out or lost a node; "
                         "their training resumes from its checkpoints (retries are counted in the manifest)")
    ss.set_defaults(fn=cmd_study_submit)
    sq = ssub.add_parser("status", help="each point's job state (squeue/sacct/qstat and the jobs' own records)")
    sq.add_argument("dir", help="study directory")
    sq.add_argument("--wait", action="store_true", help="poll until every job has finished; exit 1 if any failed")
    sq.add_argument("--timeout", type=float, default=24 * 3600, help="with --wait: give up after this many seconds")
    sq.add_argument("--json", action="store_true", help="print JSON")
    sq.set_defaults(fn=cmd_study_status)
    sc = ssub.add_parser("collect", help="read every point's summary.json and metrics into results.json")
    sc.add_argument("dir", help="study directory")
    sc.set_defaults(fn=cmd_study_collect)
    sp = ssub.add_parser("report", help="scaling table (CSV, Markdown) and plot (PNG) in DIR/report/")
    sp.add_argument("dir", help="study directory")
    sp.set_defaults(fn=cmd_study_report)
    sk = ssub.add_parser("check", help="check job scripts' directives (also your own edits)")
    sk.add_argument("scripts", nargs="+", help="job scripts")
    sk.add_argument("--scheduler", choices=("slurm", "pbs", "local"), help="default: from the directives")
    sk.set_defaults(fn=cmd_study_check)
