"""``knl-train``: the command line, a thin layer over the package's modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def cmd_launch(args) -> int:
    from knl_train.tuning import launch
    plan = launch.LaunchPlan(np=args.np, command=tuple(args.command), controller=args.controller,
                             hostfile=args.hostfile, oversubscribe=args.oversubscribe,
                             threads_per_rank=args.threads_per_rank)
    os.environ.setdefault("KNL_TRAIN_PROGRESS", "bar" if sys.stdout.isatty() else "lines")
    line = launch.argv(plan)
    print(f"knl-train launch: {launch.render(line)}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(launch.render(line))
        return 0
    os.execv(line[0], line)
    return 0  # not reached


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
    la.add_argument("--dry-run", action="store_true", help="print the launcher line, do not run it")
    la.set_defaults(fn=cmd_launch, command=[])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # TF 2.15's C++ start-up chatter (CUDA factory "errors" on CPU-only hosts, the oneDNN
    # notice) buries the real output; Python-level errors still surface as exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ITEX_CPP_MIN_LOG_LEVEL", "1")
    command: List[str] = []
    if argv and argv[0] == "launch" and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fn is cmd_launch:
        args.command = command
    try:
        from knl_train.tuning import itex
        if itex.requested():
            itex.enable()
        return args.fn(args)
    except UserError as e:
        if launcher_rank() == 0:
            print(f"knl-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
