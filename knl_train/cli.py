"""``knl-train``: the command line, a thin layer over the package's modules."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from knl_train import __version__
from knl_train.dist import launcher_rank
from knl_train.errors import UserError


# ---- subcommands ---------------------------------------------------------------------------------
def cmd_version(args) -> int:
    from knl_train import stack
    info = stack.versions()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("knl-train", info["knl_train"] or __version__),
        ("Python", info["python"]),
        ("TensorFlow", info["tensorflow"]),
        ("Keras", info["keras"]),
        ("Horovod", f"{info['horovod']} (controllers: {', '.join(info['horovod_controllers']) or 'none'}; "
                    f"tensor operations: {', '.join(info['horovod_tensor_operations']) or 'none'})"),
        ("ITEX", _itex_line(info)),
        ("MPI", info["mpi"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _itex_line(info) -> str:
    from knl_train.tuning import itex
    if not info["itex"]:
        return "not installed"
    if itex.site_version():
        return f"{info['itex']} (in site-packages: always on)"
    state = "on" if info["itex_active"] else "off"
    return f"{info['itex']} ({state}; {itex.ENV_VAR}=1 turns it on; installed in {itex.side_dir()})"


def cmd_train(args) -> int:
    from knl_train.train import config as train_config
    cfg = train_config.load(args.config, args.set)
    from knl_train.train import trainer
    trainer.run(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
    return 0


def cmd_data_make_demo(args) -> int:
    from knl_train.data.demo import DemoSpec, make_demo
    spec = DemoSpec(classes=args.classes, train_per_class=args.train_per_class,
                    val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    if make_demo(args.out, spec, progress=not args.quiet):
        print(f"wrote {spec.classes} classes x ({spec.train_per_class} train + {spec.val_per_class} val) "
              f"JPEG images of {spec.size} px to {args.out}")
    else:
        print(f"{args.out} already holds this dataset; nothing to do")
    return 0


def cmd_data_to_tfrecord(args) -> int:
    from knl_train.data.tfrecord import to_tfrecord
    meta = to_tfrecord(args.src, args.out, shards=args.shards, workers=args.workers,
                       label_offset=args.label_offset, val_shards=args.val_shards,
                       progress=not args.quiet)
    for prefix, info in meta["splits"].items():
        print(f"wrote {info['examples']} {prefix} examples in {info['shards']} shards to {args.out}")
    return 0


def _preset_arg(value: str):
    return None if value == "none" else value


def cmd_launch(args) -> int:
    from knl_train.tuning import launch
    plan = launch.LaunchPlan(np=args.np, command=tuple(args.command), controller=args.controller,
                             hostfile=args.hostfile, oversubscribe=args.oversubscribe,
                             threads_per_rank=args.threads_per_rank,
                             preset=_preset_arg(args.preset), ranks_per_node=args.ranks_per_node)
    os.environ.setdefault("KNL_TRAIN_PROGRESS", "bar" if sys.stdout.isatty() else "lines")
    node = launch.node_plan(plan)
    if node is not None:
        _tell(node)
        if plan.hostfile and plan.preset == "auto":
            print(f"knl-train launch: note: the preset ({node.preset.name}) and the cores per rank "
                  "were worked out on this host; pass --preset and --ranks-per-node if the nodes in "
                  "the hostfile differ from it", file=sys.stderr)
    line = launch.argv(plan, node=node)
    print(f"knl-train launch: {launch.render(line)}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(launch.render(line))
        return 0
    os.execv(line[0], line)
    return 0  # not reached


def cmd_env(args) -> int:
    from knl_train.tuning import env, preset, topology
    if args.list:
        for p in preset.builtin():
            print(f"{p.name:<10}  {p.title}")
        return 0
    if args.topology == "detect":
        topo = topology.detect()
    elif args.topology == "nominal":
        topo = _nominal(args.preset)
    else:
        topo = topology.load_snapshot(args.topology)
    node = env.node_plan(args.preset, args.ranks_per_node, cores_per_rank=args.threads_per_rank,
                         oversubscribe=args.oversubscribe, topology=topo)
    ref = env.preset_ref(args.preset, node)
    if args.format != "sh":  # sh prints them as comments
        _tell(node)
    print(env.lines(node, args.format, preset_ref=ref, nodes=args.nodes, rank=args.local_rank,
                    command=args.command, oversubscribe=args.oversubscribe, topology=topo))
    return 0


def _tell(node) -> None:
    for w in node.warnings:
        print(f"knl-train: warning: {w}", file=sys.stderr)
    for n in node.notes:
        print(f"knl-train: note: {n}", file=sys.stderr)


def _nominal(ref: str):
    from knl_train.tuning import preset, topology
    if ref == "auto":
        raise UserError("--topology nominal needs a named --preset: the node it was written for")
    p = preset.load(ref)
    if p.node is None:
        raise UserError(f"preset {p.name} names no node; use --topology detect or a snapshot file")
    n = p.node
    return topology.synthetic(n.model_name, n.vendor, n.flags, n.sockets, n.cores_per_socket,
                              n.threads_per_core, memory_gb=n.memory_gb, mcdram_gb=n.mcdram_gb,
                              memory_mode=n.memory_mode if n.memory_mode != "none" else "cache")


def cmd_exec(args) -> int:
    from knl_train.tuning import env
    env.exec_command(args.command)
    return 0  # not reached


def cmd_topology(args) -> int:
    from knl_train.tuning import preset, topology
    from knl_train.io import write_json_atomic
    if args.record:
        write_json_atomic(args.record, topology.record(name=args.name or os.uname().nodename))
        print(f"wrote a topology snapshot to {args.record}")
        return 0
    topo = topology.detect()
    if args.json:
        print(json.dumps(topo.to_dict(), indent=2))
        return 0
    print(topo.describe())
    chosen = preset.detect(topo)
    print(f"allowed CPUs: {len(topo.allowed)} of {len(topo.cpus)}; preset: {chosen.name} ({chosen.title})")
    return 0


def cmd_study_render(args) -> int:
    from knl_train.studies import render, spec
    if not args.out and not args.dry_run:
        raise UserError("study render needs --out DIR (the study directory to create), or --dry-run")
    study = spec.load(args.spec)
    if args.templates:
        study = _with_templates(study, args.templates)
    rendered = render.render(study)
    for note in study.notes:
        print(f"knl-train: warning: {note}", file=sys.stderr)
    if args.dry_run:
        print(render.dry_run_text(rendered))
        return 0
    out = render.write(rendered, args.out, force=args.force)
    pts = rendered.manifest["points"]
    print(f"wrote {len(pts)} {rendered.manifest['scheduler']} script(s) for {study.site.name} to {out} "
          f"({pts[0]['nodes']}-{pts[-1]['nodes']} nodes, {study.node.ranks_per_node} ranks/node, "
          f"preset {study.node.preset.name}); next: knl-train study submit {out}")
    return 0


def _with_templates(study, templates: str):
    import dataclasses
    return dataclasses.replace(study, spec=dataclasses.replace(study.spec, templates=os.path.abspath(templates)))


def cmd_study_submit(args) -> int:
    from knl_train.studies import track
    jobs = track.submit(args.dir, attempts=args.attempts, base_delay=args.retry_delay, resubmit=args.resubmit,
                        log=lambda msg: print(msg, flush=True))
    new = sum(1 for j in jobs if j["new"])
    print(f"{new} job(s) submitted, {len(jobs) - new} already submitted; follow them with "
          f"knl-train study status {args.dir}")
    return 0


def cmd_study_status(args) -> int:
    from knl_train.studies import track
    if args.wait:
        rows = track.wait(args.dir, timeout=args.timeout,
                          on_change=lambda r: print(track.table(r) + "\n", flush=True))
    else:
        rows = track.status(args.dir)
    if args.json:
        import dataclasses
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    elif not args.wait:
        print(track.table(rows))
    bad = [r for r in rows if r.state not in ("completed", "pending", "running", "rendered")]
    return 1 if args.wait and bad else 0


def cmd_study_collect(args) -> int:
    from knl_train.studies import report
    results = report.collect(args.dir)
    rows = report.table(results)
    print(f"{len(rows)} point(s) with data, {len(report.missing(results))} without; "
          f"wrote {os.path.join(args.dir, 'results.json')}")
    return 0


def cmd_study_report(args) -> int:
    from knl_train.studies import report
    paths = report.report(args.dir)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for k, p in paths.items() if k != "results"))
    return 0


def cmd_study_check(args) -> int:
    from knl_train.studies import schedulers
    bad = 0
    for path in args.scripts:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        kind = args.scheduler or ("pbs" if re.search(r"^#PBS", text, re.M) else "slurm")
        problems = schedulers.get(kind).check(text)
        for p in problems:
            print(f"{path}: {p}")
        if not problems:
            print(f"{path}: ok ({kind})")
        bad += bool(problems)
    return 1 if bad else 0


# ---- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knl-train", description=(
        "Large-batch data-parallel CNN training (LARS, Horovod) on CPU clusters."))
    p.add_argument("--version", action="version", version=f"knl-train {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    v = sub.add_parser("version", help="versions of TF, Keras, Horovod (with its controllers), ITEX, MPI")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(fn=cmd_version)

    t = sub.add_parser("train", help="train one rank (run under mpirun / knl-train launch)")
    t.add_argument("--config", "-c", help="YAML training config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optimizer.momentum=0.9 (repeatable)")
    r = t.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true",
                   help="resume from the run directory's newest checkpoint; fail if there is none "
                        "(without --resume or --fresh: resume if there is one)")
    r.add_argument("--fresh", action="store_true",
                   help="start afresh even if the run directory holds checkpoints")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    m = dsub.add_parser("make-demo", help="write a learnable mini-ImageNet of JPEG files")
    m.add_argument("--out", required=True, help="output directory (ImageNet layout)")
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--train-per-class", type=int, default=260)
    m.add_argument("--val-per-class", type=int, default=50)
    m.add_argument("--size", type=int, default=32, help="image side in pixels")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(fn=cmd_data_make_demo)
    r = dsub.add_parser("to-tfrecord", help="convert a folder dataset to TFRecord shards (ImageNet schema)")
    r.add_argument("--src", required=True, help="folder dataset (train/<wnid>/*.JPEG, val/<wnid>/*)")
    r.add_argument("--out", required=True, help="output directory for the shards")
    r.add_argument("--shards", type=int, required=True, help="number of train shards")
    r.add_argument("--val-shards", type=int, default=None, help="number of val shards (default: --shards)")
    r.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    r.add_argument("--label-offset", type=int, default=1,
                   help="added to the 0-based class index (1: TF's build_imagenet_data convention)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_data_to_tfrecord)

    la = sub.add_parser("launch", help="run a command on N ranks with mpirun (or horovodrun --gloo)",
                        usage="knl-train launch -np N [options] -- COMMAND ...")
    la.add_argument("-np", "--np", type=int, required=True, help="number of ranks")
    la.add_argument("--controller", choices=("mpi", "gloo"), default="mpi",
                    help="Horovod controller: mpi (mpirun) or gloo (horovodrun --gloo)")
    la.add_argument("--hostfile", help="Open MPI hostfile ('host slots=K' lines)")
    la.add_argument("--threads-per-rank", type=int, default=0,
                    help="cores bound to each rank (default: this host's cores / ranks)")
    la.add_argument("--oversubscribe", action="store_true",
                    help="allow more ranks x threads than cores (testing only; nothing is bound)")
    la.add_argument("--preset", default="auto",
                    help="threading preset: a name (knl-train env --list), a preset YAML file, "
                         "auto (from the detected CPU; the default) or none (bind only, TF defaults)")
    la.add_argument("--ranks-per-node", type=int, default=0,
                    help="with --hostfile: ranks on each node (default: the preset's)")
    la.add_argument("--dry-run", action="store_true", help="print the launcher line, do not run it")
    la.set_defaults(fn=cmd_launch, command=[])

    e = sub.add_parser("env", help="a preset's per-rank threading settings, as exports or launcher lines",
                       usage="knl-train env [--preset P] [--ranks-per-node R] [--format F] [-- COMMAND ...]")
    e.add_argument("--preset", default="auto", help="a name, a preset YAML file, or auto (the default)")
    e.add_argument("--ranks-per-node", type=int, default=0, help="default: the preset's for this node")
    e.add_argument("--threads-per-rank", type=int, default=0, help="cores per rank (default: cores / ranks)")
    e.add_argument("--oversubscribe", action="store_true", help="allow ranks x cores over the node's cores")
    e.add_argument("--format", default="sh", choices=("sh", "mpirun", "srun", "aprun", "impi", "json"))
    e.add_argument("--nodes", type=int, default=1, help="nodes, for the launcher lines' rank counts")
    e.add_argument("--local-rank", type=int, default=0, help="the rank whose exports --format sh prints")
    e.add_argument("--topology", default="detect",
                   help="detect (this node), nominal (the node the preset was written for) or a "
                        "snapshot file from knl-train topology --record")
    e.add_argument("--list", action="store_true", help="list the built-in presets")
    e.set_defaults(fn=cmd_env, command=[])

    x = sub.add_parser("exec", help="apply this rank's preset settings, then run COMMAND (used by launch)",
                       usage="knl-train exec -- COMMAND ...")
    x.set_defaults(fn=cmd_exec, command=[])

    from knl_train.tuning import autotune
    tu = sub.add_parser("tune", help="measure threading settings on this node; write the best as a preset")
    autotune.add_arguments(tu)
    tu.set_defaults(fn=autotune.main)

    st = sub.add_parser("study", help="scaling studies on Slurm or PBS: render, submit, status, collect, report")
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
    ss.add_argument("--resubmit", action="store_true",
                    help="PBS: submit points whose earlier submission was cut off (check qstat first)")
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
    sk.add_argument("--scheduler", choices=("slurm", "pbs"), help="default: from the directives")
    sk.set_defaults(fn=cmd_study_check)

    tp = sub.add_parser("topology", help="this node's sockets, cores, threads, NUMA nodes, ISA and preset")
    tp.add_argument("--json", action="store_true", help="print JSON")
    tp.add_argument("--record", metavar="FILE", help="write a snapshot of the files it reads (for bug reports)")
    tp.add_argument("--name", help="the snapshot's name (default: the host name)")
    tp.set_defaults(fn=cmd_topology)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # TF 2.15's C++ start-up chatter (CUDA factory "errors" on CPU-only hosts, the oneDNN
    # notice) buries the real output; Python-level errors still surface as exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ITEX_CPP_MIN_LOG_LEVEL", "1")
    command: List[str] = []
    if argv and argv[0] in ("launch", "env", "exec") and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fn in (cmd_launch, cmd_env, cmd_exec):
        args.command = command
    try:
        if args.fn is cmd_train:
            from knl_train.tuning import env
            env.apply()
        from knl_train.tuning import itex
        if itex.requested():
            itex.enable()
        return args.fn(args)
    except UserError as e:
        if launcher_rank() == 0:
            print(f"knl-train: error: {e}", file=sys.stderr, flush=True)
        elif args.fn is cmd_exec:
            # What goes wrong in exec (binding, numactl, a local rank) is often one rank's alone.
            print(f"knl-train: error (rank {launcher_rank()}): {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
