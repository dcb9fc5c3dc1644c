"""``knl-train tune``: the autotuner's options, one call to ``knl_train.autotune``, the table."""

from __future__ import annotations

import os
import re
from typing import Optional

from knl_train import autotune
from knl_train.autotune import STRATEGIES, Space, TuneOptions, TuneResult, Workload
from knl_train.autotune.trial import PRECISIONS
from knl_train.errors import UserError
from knl_train.yamlconfig import did_you_mean, number

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


def add_parsers(sub) -> None:
    tu = sub.add_parser("tune", help="measure threading settings on this node; write the best as a preset")
    add_arguments(tu)
    tu.set_defaults(fn=main)


def main(args) -> int:
    tune(args)
    return 0


def tune(args) -> Optional[TuneResult]:
    """Tune as ``args`` say and print the table; the result (None for --dry-run)."""
    options = options_from_args(args)
    if args.dry_run:
        for candidate in autotune.dry_run(options):
            print(candidate)
        return None
    result = autotune.run(options)
    files, best = result.files, result.best.candidate
    print(autotune.markdown(result))
    print(f"wrote {files.preset}, {files.results}, {files.table} and {files.chart}; on one node: "
          f"knl-train launch -np {best.ranks} --preset {files.preset} -- knl-train train --config "
          "CONFIG" + (f" --set precision={best.precision}" if best.precision != "fp32" else ""))
    return result


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


def options_from_args(args) -> TuneOptions:
    """The checked options; a UserError naming the first bad one."""
    workload = workload_from_args(args)
    space = space_from_args(args)
    _check_model(workload.model)
    if args.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise UserError(f"--name {args.name!r}: use letters, digits, '-', '_' and '.' (it names a file)")
    return TuneOptions(workload=workload, space=space, strategy=args.strategy, repeats=args.repeats,
                       min_gain=args.min_gain, timeout=args.timeout, keep_going=args.keep_going,
                       out=args.out, name=args.name, progress=not args.quiet)


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
                raise UserError(f"{option}: unknown precision {item!r}{did_you_mean(item, PRECISIONS)}; "
                                f"choose from {', '.join(PRECISIONS)}, e.g. {option} fp32,mixed_bf16")
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


def space_from_args(args) -> Space:
    values = {}
    for option, (dim, _, _) in LIST_OPTIONS.items():
        text = getattr(args, option.lstrip("-").replace("-", "_"))
        if text not in ("", None):
            values[dim] = parse_list(option, text)
    return Space(**values)


def _checked(name: str, value, **bounds):
    try:
        return number(name, value, **bounds)
    except ValueError as e:
        raise UserError(str(e)) from None


def workload_from_args(args) -> Workload:
    for name in ("image_size", "batch", "classes", "warmup", "steps", "repeats"):
        _checked(f"--{name.replace('_', '-')}", getattr(args, name), minimum=1, integer=True)
    if args.image_size < 32 and args.model.startswith("resnet50"):
        raise UserError(f"--image-size {args.image_size}: {args.model} needs at least 32 px")
    _checked("--min-gain (percent)", args.min_gain, minimum=0)
    _checked("--timeout (seconds)", args.timeout, above=0)
    return Workload(model=args.model, image_size=args.image_size, batch=args.batch,
                    classes=args.classes, warmup=args.warmup, steps=args.steps)


def _check_model(name: str) -> None:
    # Here, not at the top: the registry imports TensorFlow, which the CLI loads only to run.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from knl_train.models import MODELS  # registers the models
    if name not in MODELS:
        raise UserError(f"--model {name!r} is not in the registry{did_you_mean(name, MODELS)}; "
                        f"available: {', '.join(sorted(MODELS))}")
