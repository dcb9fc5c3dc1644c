"""``knl-train launch``, ``env``, ``exec`` and ``topology``: ranks, presets and binding."""

from __future__ import annotations

import json
import os
import sys

from knl_train.errors import UserError

# The commands that run a COMMAND given after "--".
TAKES_COMMAND = ("launch", "env", "exec")


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
    from knl_train.runtime import bootstrap
    bootstrap.exec_command(args.command)
    return 0  # not reached


def cmd_topology(args) -> int:
    from knl_train.tuning import preset, topology
    from knl_train.atomic import write_json_atomic
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


def add_parsers(sub) -> None:
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
    la.set_defaults(fn=cmd_launch, command=[], takes_command=True)

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
    e.set_defaults(fn=cmd_env, command=[], takes_command=True)

    x = sub.add_parser("exec", help="apply this rank's preset settings, then run COMMAND (used by launch)",
                       usage="knl-train exec -- COMMAND ...")
    x.set_defaults(fn=cmd_exec, command=[], takes_command=True, errors_per_rank=True)

    from knl_train.tuning import autotune
    tp = sub.add_parser("topology", help="this node's sockets, cores, threads, NUMA nodes, ISA and preset")
    tp.add_argument("--json", action="store_true", help="print JSON")
    tp.add_argument("--record", metavar="FILE", help="write a snapshot of the files it reads (for bug reports)")
    tp.add_argument("--name", help="the snapshot's name (default: the host name)")
    tp.set_defaults(fn=cmd_topology)
