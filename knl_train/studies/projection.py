"""A study point's projected time to train, from its runs' own time accounts.

For E epochs: start-up + E × (epoch steps + evaluation per epoch + checkpoint per epoch). The
steps take images_per_epoch / X (X: the point's steady images/s, measured by the report); the
rest comes from each repeat's ``summary.json`` (``startup_seconds``, ``eval_seconds``,
``checkpoint_seconds`` and the ``evaluations`` and ``checkpoints`` they cover) and the cadence in
its ``config.yaml`` (``eval.every_epochs``, ``checkpoint.every_epochs``); then the median over
the repeats.

"Per epoch" means per epoch of the projected run: one evaluation costs what the repeat's
evaluations cost on average, and an E-epoch run evaluates ceil(E/k) times (every k-th epoch's end
and the last). Dividing a repeat's seconds by the epochs it trained would not do: a study's runs
are usually a fraction of an epoch long and still evaluate and checkpoint once, at their end.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import yaml

from knl_train import records
from knl_train.train.config import CheckpointConfig, EvalConfig

CONFIG = "config.yaml"    # the run's resolved config, written by the trainer beside its summary
COSTS = ("eval_seconds_per_epoch", "checkpoint_seconds_per_epoch", "startup_seconds")
# The summary fields a projection needs (None in a summary from a knl-train without the account).
ACCOUNT_SECONDS = ("startup_seconds", "eval_seconds", "checkpoint_seconds")
ACCOUNT_COUNTS = ("evaluations", "checkpoints")


def events(epochs: float, every: int) -> int:
    """Evaluations (or checkpoints) in a run of ``epochs`` epochs: at every ``every``-th epoch's
    end, and at the last one (the trainer always evaluates and saves the end of a run)."""
    return math.ceil(epochs / every)


def repeat_costs(summary: records.RunSummary, run_dir: Path, epochs: float) -> Dict:
    """One repeat's start-up, and its evaluation and checkpoint seconds per epoch of an
    ``epochs``-epoch run, with what they came from; or ``{"costs_unknown": why}``."""
    fields = ACCOUNT_SECONDS + ACCOUNT_COUNTS
    absent = [k for k in fields if getattr(summary, k) is None]
    if len(absent) == len(fields):
        return {"costs_unknown": "summary.json has no time account (an older knl-train)"}
    if absent:
        return {"costs_unknown": f"summary.json has no {', '.join(absent)}"}
    bad = [k for k in ACCOUNT_SECONDS
           if not (records.is_number(getattr(summary, k)) and getattr(summary, k) >= 0)]
    bad += [k for k in ACCOUNT_COUNTS
            if not (records.is_integer(getattr(summary, k)) and getattr(summary, k) >= 0)]
    if bad:
        return {"costs_unknown": f"summary.json: invalid {', '.join(bad)}"}
    cadence = _cadence(run_dir / CONFIG)
    if isinstance(cadence, str):
        return {"costs_unknown": cadence}
    out = {"startup_seconds": float(summary.startup_seconds)}
    for name, seconds, count, every in (
            ("eval", summary.eval_seconds, summary.evaluations, cadence[0]),
            ("checkpoint", summary.checkpoint_seconds, summary.checkpoints, cadence[1])):
        # None done (no validation set, say): nothing per epoch; seconds without a count: one.
        each = float(seconds) / max(count, 1)
        out.update({f"{name}_seconds_each": each, f"{name}_every_epochs": every,
                    f"{name}_seconds_per_epoch": each * events(epochs, every) / epochs})
    return out


def _cadence(path: Path) -> Union[Tuple[int, int], str]:
    """(eval.every_epochs, checkpoint.every_epochs) of the run's config, or why not."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return f"no {CONFIG} (the run's evaluation and checkpoint cadence)"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return f"{CONFIG} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not isinstance(data, dict):
        return f"{CONFIG} is not a mapping"
    out = []
    # A key left out means the default the run used.
    for section, default in (("eval", EvalConfig().every_epochs),
                             ("checkpoint", CheckpointConfig().every_epochs)):
        block = data.get(section) or {}
        every = block.get("every_epochs", default) if isinstance(block, dict) else None
        if not (records.is_integer(every) and every >= 1):
            return f"{CONFIG}: {section}.every_epochs is not a positive integer"
        out.append(every)
    return out[0], out[1]


def point_costs(repeats: Sequence[Dict]) -> Dict[str, Optional[float]]:
    """The medians over a point's usable repeats; all None unless every one of them has its
    costs (a point is not projected from a mix of accounted and unaccounted runs)."""
    ok = [r for r in repeats if r["status"] == "ok"]
    if not ok or any("costs_unknown" in r for r in ok):
        return dict.fromkeys(COSTS)
    return {k: statistics.median(r[k] for r in ok) for k in COSTS}


def known(costs: Dict) -> bool:
    return all(costs.get(k) is not None for k in COSTS)


def hours(epochs: float, epoch_seconds: float, costs: Dict) -> float:
    """Projected hours for ``epochs`` epochs; from the step time alone when costs are unknown."""
    if not known(costs):
        return epochs * epoch_seconds / 3600
    return (costs["startup_seconds"] + epochs * (epoch_seconds + costs["eval_seconds_per_epoch"]
                                                 + costs["checkpoint_seconds_per_epoch"])) / 3600
