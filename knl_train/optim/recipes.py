"""Published large-batch recipes (AlexNet-BN 8K-32K, ResNet-50 512-32K) as named, cited data.

The numbers live in ``recipes.yaml`` (package data) with a ``source`` per recipe and the list of
``inferred`` fields, i.e. the ones the sources do not state. ``get(name)`` returns a frozen
``Recipe``; ``Recipe.to_config_dict()`` gives its values in the shape of the training config
(``optimizer.*``, ``schedule.*``, ``global_batch``, ``epochs``, ``label_smoothing``), which is
how a recipe reaches the trainer (``recipe:`` in the config) and its schedule builders.

    >>> r = get("alexnet_bn_32k_intel_32nodes")
    >>> r.schedule.peak_lr, r.schedule.warmup_epochs, r.schedule.decay_over
    (33.0, 10.0, 'global')
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from knl_train import resources, yamlconfig
from knl_train.errors import UserError
from knl_train.optim import names as choices
from knl_train.yamlconfig import in_range, one_of

# A recipe's optimizer is LARS or momentum SGD: OptimizerSpec has no LAMB betas.
RECIPE_OPTIMIZERS = tuple(n for n in choices.OPTIMIZER_NAMES if n != "lamb")
RECIPES_FILE = "recipes.yaml"


class RecipeError(UserError, ValueError):
    """An unknown recipe name or a malformed recipes file."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    variant: Optional[choices.LarsVariant]
    momentum: float
    weight_decay: float
    trust_coefficient: Optional[float]
    epsilon: float
    momentum_correction: bool
    exclude_from_weight_decay: Tuple[str, ...]
    exclude_from_layer_adaptation: Tuple[str, ...]

    def __post_init__(self):
        one_of("name", self.name, RECIPE_OPTIMIZERS)
        if self.name == "lars" and self.variant is None:
            raise ValueError("variant is required for LARS")
        if self.name == "lars" and self.trust_coefficient is None:
            raise ValueError("trust_coefficient is required for LARS")
        in_range(self, "momentum", "weight_decay", "epsilon", minimum=0)
        in_range(self, "trust_coefficient", above=0)


@dataclass(frozen=True)
class ScheduleSpec:
    kind: choices.ScheduleKind
    peak_lr: float
    warmup_epochs: float
    warmup_start_lr: float
    end_lr: float
    power: float
    decay_over: choices.DecayMode
    boundary_epochs: Tuple[float, ...] = ()
    decay_factor: Optional[float] = None

    def __post_init__(self):
        in_range(self, "peak_lr", "power", "decay_factor", above=0)
        in_range(self, "warmup_epochs", "warmup_start_lr", "end_lr", minimum=0)


@dataclass(frozen=True)
class Iterations:
    """Iteration counts as published (the schedule above is their epoch equivalent)."""

    warmup: Optional[int] = None
    total: Optional[int] = None

    def __post_init__(self):
        in_range(self, "warmup", "total", above=0)


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
def _parse(name: str, data) -> Recipe:
    """One entry of recipes.yaml as a checked ``Recipe``; a RecipeError names the recipe."""
    try:
        recipe = yamlconfig.from_dict(Recipe, _prepared(name, data))
        _check(recipe)
    except (UserError, ValueError) as e:
        raise RecipeError(f"{RECIPES_FILE}: recipe {name!r}: {e}") from None
    return recipe


def _prepared(name: str, data) -> Dict[str, Any]:
    """The entry with its name, its text on one line, and a warmup derived from iterations."""
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a mapping of fields, got {data!r}")
    if "name" in data:
        raise ValueError(f"unknown key 'name': a recipe is named by its key in {RECIPES_FILE}")
    out = {**data, "name": name, "notes": " ".join(str(data.get("notes") or "").split())}
    if isinstance(data.get("source"), str):
        out["source"] = " ".join(data["source"].split())
    if "inferred" in data:
        out["inferred"] = list(data["inferred"] or ())
    schedule = data.get("schedule")
    if isinstance(schedule, Mapping) and "warmup_epochs" not in schedule:
        out["schedule"] = {**schedule, "warmup_epochs": _warmup_from_iterations(data)}
        if "inferred" in out:
            out["inferred"].append("schedule.warmup_epochs")
    return out


def _warmup_from_iterations(data: Mapping) -> float:
    """``epochs · iterations.warmup / iterations.total``: the published warmup in epochs."""
    given = data.get("iterations")
    its = None if given is None else yamlconfig.from_dict(Iterations, given, "iterations")
    if its is None or its.warmup is None or its.total is None:
        raise ValueError("schedule.warmup_epochs is required unless iterations.warmup and "
                         "iterations.total are given")
    epochs = yamlconfig.number("epochs", data.get("epochs"), above=0, integer=True)
    return epochs * its.warmup / its.total


def _check(recipe: Recipe) -> None:
    """What ties a recipe's fields together (each nested section checks its own)."""
    in_range(recipe, "epochs", "global_batch", above=0)
    in_range(recipe, "label_smoothing", "reported_top1", minimum=0)
    if recipe.batch_range is not None:
        low, high = recipe.batch_range
        yamlconfig.number("batch_range[0]", low, above=0)
        if high is not None and high <= low:
            raise ValueError(f"batch_range upper bound {high} must be > {low}")
    if recipe.global_batch is None and recipe.batch_range is None:
        raise ValueError("give global_batch, batch_range or both")
    if not recipe.source:
        raise ValueError("source must be a non-empty citation")
    for path in recipe.inferred:
        if not _has_field(recipe, path):
            raise ValueError(f"inferred names {path!r}, which is not a recipe field")
    if recipe.global_batch is not None and not recipe.applies_to(recipe.global_batch):
        raise ValueError(f"global_batch {recipe.global_batch} is outside batch_range "
                         f"{recipe.batch_range}")


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
        raise RecipeError(str(yamlconfig.unknown("recipe", name, recipes)))
    return recipes[name]


__all__ = ["Iterations", "OptimizerSpec", "RECIPE_OPTIMIZERS", "Recipe", "RecipeError",
           "ScheduleSpec", "get", "names"]
