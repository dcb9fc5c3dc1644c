"""``knl-train launch``, ``env``, ``exec`` and ``topology``: ranks, presets and binding."""

from __future__ import annotations

import argparse
import json
import sys

from knl_train.runtime import bootstrap
from knl_train.tuning import launch, preset, show, snapshot, topology

# The commands that run a COMMAND given after "--".
TAKES_COMMAND = ("launch", "env", "exec")


def ranks_per_node(value: str) -> int:
    """--ranks-per-node: a whole number >= 1 (leaving the option out takes the preset's)."""
    try:
        n = int(value, 10)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 1, got {value!r}; leave it out for the preset's default")
    return n


def _preset_arg(value: str):
    return None if value == "none" else value


def cmd_launch(args) -> int:
    plan = launch.LaunchPlan(np=args.np, command=tuple(args.command), controller=args.controller,
                             hostfile=args.hostfile, oversubscribe=args.oversubscribe,
                             threads_per_rank=args.threads_per_rank,
                             preset=_preset_arg(args.preset), ranks_per_node=args.ranks_per_node)
    launch.default_progress()
    if not args.dry_run:
        return launch.run(plan)
    line = launch.prepare(plan)
    print(f"knl-train launch: {launch.render(line)}", file=sys.stderr, flush=True)
    print(launch.render(line))
    return 0


def cmd_env(args) -> int:
    if args.list:
        for p in preset.builtin():
            print(f"{p.name:<10}  {p.title}")
        return 0
    print(show.env(args.preset, args.format, ranks_per_node=args.ranks_per_node,
                   cores_per_rank=args.threads_per_rank, oversubscribe=args.oversubscribe,
                   topology=args.topology, nodes=args.nodes, local_rank=args.local_rank,
                   command=args.command))
    return 0


def cmd_exec(args) -> int:
    bootstrap.exec_command(args.command)
    return 0  # not reached


def cmd_topology(args) -> int:
    if args.record:
        snapshot.write(args.record, name=args.name or "")
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
    la.add_argument("--ranks-per-node", type=ranks_per_node, default=0,
                    help="with --hostfile: ranks on each node (default: the preset's)")
    la.add_argument("--dry-run", action="store_true", help="print the launcher line, do not run it")
    la.set_defaults(fn=cmd_launch, command=[], takes_command=True)

    e = sub.add_parser("env", help="a preset's per-rank threading settings, as exports or launcher lines",
                       usage="knl-train env [--preset P] [--ranks-per-node R] [--format F] [-- COMMAND ...]")
    e.add_argument("--preset", default="auto", help="a name, a preset YAML file, or auto (the default)")
    e.add_argument("--ranks-per-node", type=ranks_per_node, default=0, help="default: the preset's for this node")
    e.add_argument("--threads-per-rank", type=int, default=0, help="cores per rank (default: cores / ranks)")
    e.add_argument("--oversubscribe", action="store_true", help="allow ranks x cores over the node's cores")
    e.add_argument("--format", default="sh", choices=show.FORMATS,
                   help="sh (one rank's exports), json (the plan) or a launcher's line")
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

    tp = sub.add_parser("topology", help="this node's sockets, cores, threads, NUMA nodes, ISA and preset")
    tp.add_argument("--json", action="store_true", help="print JSON")
    tp.add_argument("--record", metavar="FILE", help="write a snapshot of the files it reads (for bug reports)")
    tp.add_argument("--name", help="the snapshot's name (default: the host name)")
    tp.set_defaults(fn=cmd_topology)
