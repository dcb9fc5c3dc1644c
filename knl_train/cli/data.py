"""``knl-train data``: make the demo dataset, convert a folder dataset to TFRecord."""

from __future__ import annotations


def cmd_data_make_demo(args) -> int:
    from knl_train.data import DemoSpec, make_demo
    spec = DemoSpec(classes=args.classes, train_per_class=args.train_per_class,
                    val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    if make_demo(args.out, spec, progress=not args.quiet):
        print(f"wrote {spec.classes} classes x ({spec.train_per_class} train + {spec.val_per_class} val) "
              f"JPEG images of {spec.size} px to {args.out}")
    else:
        print(f"{args.out} already holds this dataset; nothing to do")
    return 0


def cmd_data_to_tfrecord(args) -> int:
    from knl_train.data import to_tfrecord
    meta = to_tfrecord(args.src, args.out, shards=args.shards, workers=args.workers,
                       label_offset=args.label_offset, val_shards=args.val_shards,
                       progress=not args.quiet)
    # The images left out (unreadable) were named in a warning line by to_tfrecord.
    for prefix, info in meta["splits"].items():
        left_out = f" ({info['unreadable']} unreadable left out)" if info.get("unreadable") else ""
        print(f"wrote {info['examples']} {prefix} examples in {info['shards']} shards to "
              f"{args.out}{left_out}")
    return 0


def add_parsers(sub) -> None:
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
