"""``knl-train version`` and ``knl-train train``."""

from __future__ import annotations

import json

from knl_train import __version__, train
from knl_train.runtime import itex, versions


def cmd_version(args) -> int:
    info = versions.versions()
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
    if not info["itex"]:
        return "not installed"
    if itex.site_version():
        return f"{info['itex']} (in site-packages: always on)"
    state = "on" if info["itex_active"] else "off"
    return f"{info['itex']} ({state}; {itex.ENV_VAR}=1 turns it on; installed in {itex.side_dir()})"


def cmd_train(args) -> int:
    cfg = train.load(args.config, args.set)
    train.run(cfg, resume="resume" if args.resume else "fresh" if args.fresh else "auto")
    return 0


def add_parsers(sub) -> None:
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
    # A rank applies its launcher's preset before TensorFlow starts.
    t.set_defaults(fn=cmd_train, applies_preset=True)
