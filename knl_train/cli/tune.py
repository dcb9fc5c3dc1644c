"""``knl-train tune``: the autotuner."""

from __future__ import annotations

from knl_train.tuning import autotune


def add_parsers(sub) -> None:
    tu = sub.add_parser("tune", help="measure threading settings on this node; write the best as a preset")
    autotune.add_arguments(tu)
    tu.set_defaults(fn=autotune.main)
