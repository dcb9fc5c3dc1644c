"""Published large-batch recipes (AlexNet-BN 8K-32K, ResNet-50 512-32K) as named, cited data.

The numbers live in ``recipes.yaml`` (package data) with a ``source`` per recipe and the list of
``inferred`` fields, i.e. the ones the sources do not state. ``get(name)`` returns a frozen
``Recipe``; ``build_schedule``/``build_momentum`` turn it into the Keras schedules the trainer
passes to the optimizer; ``Recipe.to_config_dict()`` gives the values in the shape of the
training config (``optimizer.*``, ``schedule.*``, ``global_batch``, ``epochs``,
``label_smoothing``).

    >>> r = get("alexnet_bn_32k_intel_32nodes")
    >>> r.schedule.peak_lr, r.schedule.warmup_epochs, r.schedule.decay_over
    (33.0, 10.0, 'global')
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import yaml

from knl_train import resources
from knl_train.errors import UserError
from knl_train.optim import schedules
from knl_train.optim.lars import VARIANTS

OPTIMIZER_NAMES = ("lars", "sgd")
RECIPES_FILE = "recipes.yaml"


class RecipeError(UserError, ValueError):
    """An unknown recipe name or a malformed recipes file."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    variant: Optional[str]
    momentum: float
    weight_decay: float
    trust_coefficient: Optional[float]
    epsilon: float
    momentum_correction: bool
    exclude_from_weight_decay: Tuple[str, ...]
    exclude_from_layer_adaptation: Tuple[str, ...]


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str
    peak_lr: float
    warmup_epochs: float
    warmup_start_lr: float
    end_lr: float
    power: float
    decay_over: str
    boundary_epochs: Tuple[float, ...] = ()
    decay_factor: Optional[float] = None


@dataclass(frozen=True)
class Iterations:
    """Iteration counts as published (the schedule above is their epoch equivalent)."""

    warmup: Optional[int] = None
    total: Optional[int] = None


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    global_batch: Optional[int]
    epochs: int
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    label_smoothing: Optional[float]
    source: str
    inferred: Tuple[str, ...]
    notes: str = ""
    batch_range: Optional[Tuple[int, Optional[int]]] = None
    iterations: Optional[Iterations] = None
    reported_top1: Optional[float] = None

    def applies_to(self, global_batch: int) -> bool:
        """Whether the source uses this recipe at ``global_batch``.

        ``batch_range`` is [lowest, highest) (no upper bound when None); without a range only
        ``global_batch`` itself.
        """
        if self.batch_range is not None:
            low, high = self.batch_range
            return low <= global_batch and (high is None or global_batch < high)
        return global_batch == self.global_batch

    def to_config_dict(self) -> Dict[str, Any]:
        """The recipe's values keyed like the training config (proposed field names).

        Top level: ``epochs``, ``global_batch`` (only when the recipe has one),
        ``label_smoothing`` (only when stated); ``optimizer``: name, variant, momentum,
        weight_decay, trust_coefficient, epsilon, momentum_correction and the two exclusion
        lists (variant and trust_coefficient omitted for SGD); ``schedule``: kind, peak_lr,
        warmup_epochs, warmup_start_lr, end_lr, power, decay_over (plus boundary_epochs and
        decay_factor for step schedules). ``model`` is left out on purpose: the recipe names the
        source's network, which knl_train may not have.
        """
        opt = {k: (list(v) if isinstance(v, tuple) else v)
               for k, v in dataclasses.asdict(self.optimizer).items() if v is not None}
        sched = {k: getattr(self.schedule, k) for k in
                 ("kind", "peak_lr", "warmup_epochs", "warmup_start_lr", "end_lr", "power",
                  "decay_over")}
        if self.schedule.kind == "step":
            sched["boundary_epochs"] = list(self.schedule.boundary_epochs)
            sched["decay_factor"] = self.schedule.decay_factor
        out: Dict[str, Any] = {"epochs": self.epochs, "optimizer": opt, "schedule": sched}
        if self.global_batch is not None:
            out["global_batch"] = self.global_batch
        if self.label_smoothing is not None:
            out["label_smoothing"] = self.label_smoothing
        return out


# ---- loading -------------------------------------------------------------------------------------------
_RECIPE_KEYS = {"model", "global_batch", "epochs", "optimizer", "schedule", "label_smoothing",
                "source", "inferred", "notes", "batch_range", "iterations", "reported_top1"}
_REQUIRED = {"model", "global_batch", "epochs", "optimizer", "schedule", "label_smoothing",
             "source", "inferred"}


def _fail(name: str, msg: str):
    raise RecipeError(f"{RECIPES_FILE}: recipe {name!r}: {msg}")


def _check_keys(name: str, where: str, data: Mapping, allowed, required):
    if not isinstance(data, Mapping):
        _fail(name, f"{where} must be a mapping")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        _fail(name, f"unknown key {where}{unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(set(required) - set(data))
    if missing:
        _fail(name, f"missing key {where}{missing[0]!r}")


def _num(name: str, where: str, value, *, positive=False, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, f"{where} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        _fail(name, f"{where} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _int(name: str, where: str, value, *, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(name, f"{where} must be a positive integer, got {value!r}")
    return value


def _parse(name: str, data: Mapping) -> Recipe:
    _check_keys(name, "", data, _RECIPE_KEYS, _REQUIRED)
    inferred = list(data["inferred"] or [])

    o = data["optimizer"]
    opt_keys = {f.name for f in dataclasses.fields(OptimizerSpec)}
    _check_keys(name, "optimizer.", o, opt_keys, opt_keys)
    if o["name"] not in OPTIMIZER_NAMES:
        _fail(name, f"optimizer.name {o['name']!r} is not one of {', '.join(OPTIMIZER_NAMES)}")
    if o["name"] == "lars" and o["variant"] not in VARIANTS:
        _fail(name, f"optimizer.variant {o['variant']!r} is not one of {', '.join(VARIANTS)}")
    if o["name"] == "lars" and o["trust_coefficient"] is None:
        _fail(name, "optimizer.trust_coefficient is required for LARS")
    if not isinstance(o["momentum_correction"], bool):
        _fail(name, "optimizer.momentum_correction must be true or false")
    optimizer = OptimizerSpec(
        name=o["name"], variant=o["variant"],
        momentum=_num(name, "optimizer.momentum", o["momentum"]),
        weight_decay=_num(name, "optimizer.weight_decay", o["weight_decay"]),
        trust_coefficient=_num(name, "optimizer.trust_coefficient", o["trust_coefficient"],
                               positive=True, optional=True),
        epsilon=_num(name, "optimizer.epsilon", o["epsilon"]),
        momentum_correction=o["momentum_correction"],
        exclude_from_weight_decay=tuple(o["exclude_from_weight_decay"]),
        exclude_from_layer_adaptation=tuple(o["exclude_from_layer_adaptation"]))

    iterations = None
    if data.get("iterations") is not None:
        it = data["iterations"]
        _check_keys(name, "iterations.", it, {"warmup", "total"}, ())
        iterations = Iterations(warmup=_int(name, "iterations.warmup", it.get("warmup"), optional=True),
                                total=_int(name, "iterations.total", it.get("total"), optional=True))

    epochs = _int(name, "epochs", data["epochs"])
    s = dict(data["schedule"])
    sched_keys = {f.name for f in dataclasses.fields(ScheduleSpec)}
    required = sched_keys - {"boundary_epochs", "decay_factor", "warmup_epochs"}
    _check_keys(name, "schedule.", s, sched_keys, required)
    if "warmup_epochs" not in s:
        if iterations is None or iterations.warmup is None or iterations.total is None:
            _fail(name, "schedule.warmup_epochs is required unless iterations.warmup and "
                        "iterations.total are given")
        s["warmup_epochs"] = epochs * iterations.warmup / iterations.total
        inferred.append("schedule.warmup_epochs")
    if s["kind"] not in schedules.SCHEDULE_KINDS:
        _fail(name, f"schedule.kind {s['kind']!r} is not one of {', '.join(schedules.SCHEDULE_KINDS)}")
    if s["decay_over"] not in schedules.DECAY_MODES:
        _fail(name, f"schedule.decay_over {s['decay_over']!r} is not one of "
                    f"{', '.join(schedules.DECAY_MODES)}")
    schedule = ScheduleSpec(
        kind=s["kind"], peak_lr=_num(name, "schedule.peak_lr", s["peak_lr"], positive=True),
        warmup_epochs=_num(name, "schedule.warmup_epochs", s["warmup_epochs"]),
        warmup_start_lr=_num(name, "schedule.warmup_start_lr", s["warmup_start_lr"]),
        end_lr=_num(name, "schedule.end_lr", s["end_lr"]),
        power=_num(name, "schedule.power", s["power"], positive=True),
        decay_over=s["decay_over"],
        boundary_epochs=tuple(float(b) for b in s.get("boundary_epochs") or ()),
        decay_factor=_num(name, "schedule.decay_factor", s.get("decay_factor"), positive=True,
                          optional=True))

    batch_range = None
    if data.get("batch_range") is not None:
        br = data["batch_range"]
        if not isinstance(br, (list, tuple)) or len(br) != 2:
            _fail(name, f"batch_range must be [lowest, highest or null], got {br!r}")
        low = _int(name, "batch_range[0]", br[0])
        high = _int(name, "batch_range[1]", br[1], optional=True)
        if high is not None and high <= low:
            _fail(name, f"batch_range upper bound {high} must be > {low}")
        batch_range = (low, high)

    global_batch = _int(name, "global_batch", data["global_batch"], optional=True)
    if global_batch is None and batch_range is None:
        _fail(name, "give global_batch, batch_range or both")
    if not isinstance(data["source"], str) or not data["source"].strip():
        _fail(name, "source must be a non-empty citation")
    recipe = Recipe(
        name=name, model=str(data["model"]), global_batch=global_batch, epochs=epochs,
        optimizer=optimizer, schedule=schedule,
        label_smoothing=_num(name, "label_smoothing", data["label_smoothing"], optional=True),
        source=" ".join(data["source"].split()), inferred=tuple(inferred),
        notes=" ".join(str(data.get("notes") or "").split()), batch_range=batch_range,
        iterations=iterations,
        reported_top1=_num(name, "reported_top1", data.get("reported_top1"), optional=True))
    for path in recipe.inferred:
        if not _has_field(recipe, path):
            _fail(name, f"inferred names {path!r}, which is not a recipe field")
    if global_batch is not None and not recipe.applies_to(global_batch):
        _fail(name, f"global_batch {global_batch} is outside batch_range {batch_range}")
    return recipe


def _has_field(obj, path: str) -> bool:
    for part in path.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


@functools.lru_cache(maxsize=None)
def _load() -> Dict[str, Recipe]:
    text = resources.path("knl_train.optim", RECIPES_FILE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, Mapping) or not isinstance(data.get("recipes"), Mapping):
        raise RecipeError(f"{RECIPES_FILE}: expected a top-level 'recipes' mapping")
    return {name: _parse(name, body) for name, body in data["recipes"].items()}


# ---- public API ----------------------------------------------------------------------------------------
def names() -> Tuple[str, ...]:
    """All recipe names, sorted."""
    return tuple(sorted(_load()))


def get(name: str) -> Recipe:
    """The recipe ``name``; ``RecipeError`` (a ValueError and a UserError) lists the names."""
    recipes = _load()
    if name not in recipes:
        close = difflib.get_close_matches(str(name), recipes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown recipe {name!r}{hint}; available: {', '.join(names())}")
    return recipes[name]


def matching(global_batch: int, model: Optional[str] = None) -> Tuple[str, ...]:
    """Names of the recipes whose source uses them at ``global_batch`` (and for ``model``)."""
    return tuple(n for n in names() if get(n).applies_to(global_batch)
                 and (model is None or get(n).model == model))


def _resolve(recipe: Union[str, Recipe]) -> Recipe:
    return get(recipe) if isinstance(recipe, str) else recipe


def build_schedule(recipe: Union[str, Recipe], steps_per_epoch: int,
                   epochs: Optional[int] = None) -> schedules.LearningRateSchedule:
    """The recipe's LR schedule for ``steps_per_epoch`` (and ``epochs``, default the recipe's).

    Durations are the recipe's epochs: ``round(warmup_epochs · steps_per_epoch)`` warmup steps of
    ``round(epochs · steps_per_epoch)``; with the published iterations per epoch (e.g. 40 for
    the 4,000-iteration AlexNet-BN 32K runs) this gives the published iteration counts.
    """
    r = _resolve(recipe)
    s = r.schedule
    kwargs = dict(steps_per_epoch=steps_per_epoch, epochs=r.epochs if epochs is None else epochs,
                  peak_lr=s.peak_lr, warmup_epochs=s.warmup_epochs,
                  warmup_start_lr=s.warmup_start_lr, end_lr=s.end_lr, power=s.power,
                  decay_over=s.decay_over)
    if s.kind == "step":
        kwargs.update(boundary_epochs=s.boundary_epochs, decay_factor=s.decay_factor)
    return schedules.build_lr_schedule(s.kind, **kwargs)


def build_momentum(recipe: Union[str, Recipe], lr_schedule):
    """The recipe's momentum: a float, or ``WarmupMomentumCorrection`` over ``lr_schedule``."""
    r = _resolve(recipe)
    return schedules.build_momentum(r.optimizer.momentum, lr_schedule, r.optimizer.momentum_correction)


__all__ = ["Iterations", "OptimizerSpec", "Recipe", "RecipeError", "ScheduleSpec",
           "build_momentum", "build_schedule", "get", "matching", "names"]
