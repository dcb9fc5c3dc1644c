"""``knl-train``: the command line. Each command group is a module here; each command parses,
makes one library call, and prints."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from knl_train import __version__
from knl_train import log as knl_log
from knl_train.errors import UserError
from knl_train.cli import data, study, train, tune, tuning
from knl_train.runtime import outcome
from knl_train.runtime.rankenv import launcher_rank

log = knl_log.get("cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knl-train", description=(
        "Large-batch data-parallel CNN training (LARS, Horovod) on CPU clusters."))
    p.add_argument("--version", action="version", version=f"knl-train {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (train, data, tuning, tune, study):
        group.add_parsers(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # TF 2.15's C++ start-up chatter (CUDA factory "errors" on CPU-only hosts, the oneDNN
    # notice) buries the real output; Python-level errors still surface as exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ITEX_CPP_MIN_LOG_LEVEL", "1")
    command: List[str] = []
    # Commands that run another command take it after "--", untouched by argparse.
    if argv and argv[0] in tuning.TAKES_COMMAND and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if getattr(args, "takes_command", False):
        args.command = command
    try:
        if getattr(args, "applies_preset", False):
            from knl_train.runtime import bootstrap
            bootstrap.apply()
        from knl_train.runtime import itex
        if itex.requested():
            itex.enable()
        return args.fn(args)
    except UserError as e:
        # What goes wrong in exec (binding, numactl, a local rank) is often one rank's alone.
        return _user_error(e, alone=getattr(args, "errors_per_rank", False))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001  only a peer's shutdown is handled here
        if outcome.in_job() and outcome.peer_shut_down(e):
            _peer_failed()
        raise


def _user_error(error: UserError, *, alone: bool) -> int:
    """Say ``error`` once: the rank that saw it alone says it with its number, an error every
    rank shares is said by rank 0. In a job, every rank then leaves at once (``outcome``)."""
    alone = alone or knl_log.seen_by_this_rank(error)
    says = alone or launcher_rank() == 0
    if says:
        log.error(str(error), extra=knl_log.RANK_ERROR if alone else None)
    if not outcome.in_job():
        return 2
    # On record, knl-train launch exits 2 for the job, and this rank may leave with 0, which
    # spares the job mpirun's kill grace; unless the error is this rank's alone and came before
    # Horovod started: the other ranks would wait for it in their start-up, so mpirun must end them.
    on_record = outcome.record("error", message=str(error), said=says)
    outcome.end_rank(0 if on_record and (outcome.horovod_started() or not alone) else 2)


def _peer_failed() -> None:
    """Another rank shut Horovod down (its error, said by it): leave quietly, at once; with
    status 0 only if that error is on launch's record."""
    outcome.end_rank(0 if outcome.peer_errors() else 1)


if __name__ == "__main__":
    sys.exit(main())
