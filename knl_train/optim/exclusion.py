"""Which variables LARS/LAMB leave alone (and SGD does not decay): by rank and by name.

The default excludes every variable of rank <= 1 (BN gamma/beta, biases). Rank, not name:
keras.applications names BN variables like ``conv1_bn/gamma``, so the customary
``batch_normalization`` pattern silently matches nothing there (lars.md §0.8).

A rule is a list of entries, each either the token ``"@rank<=1"`` or a regular expression
searched in the variable's name without TF's ``:0`` suffix. ``None`` means the default
``["@rank<=1"]``; a list replaces the default, so ``["@rank<=1", "head"]`` adds to it and ``[]`` excludes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

RANK_LE_1 = "@rank<=1"
DEFAULT = (RANK_LE_1,)


@dataclass(frozen=True)
class ExclusionRule:
    patterns: Tuple[str, ...]

    @classmethod
    def from_config(cls, patterns: Optional[Sequence[str]]) -> "ExclusionRule":
        if patterns is None:
            return cls(DEFAULT)
        if isinstance(patterns, str):
            patterns = [patterns]
        for p in patterns:
            if p.startswith("@") and p != RANK_LE_1:
                raise ValueError(f"unknown exclusion token {p!r}; the only token is {RANK_LE_1!r}")
            if not p.startswith("@"):
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"exclusion pattern {p!r} is not a valid regex: {e}") from None
        return cls(tuple(patterns))

    def matches(self, var) -> bool:
        # Without TF's ":0" output suffix, so that "bias$" means what it says.
        name = re.sub(r":\d+$", "", var.name)
        for p in self.patterns:
            if p == RANK_LE_1:
                if var.shape.rank is not None and var.shape.rank <= 1:
                    return True
            elif re.search(p, name):
                return True
        return False


class ExclusionMixin:
    """Weight-decay and layer-adaptation exclusions for layer-wise optimizers (LARS, LAMB).

    The optimizer sets ``self.weight_decay`` and calls ``_set_exclusions`` in its constructor,
    keeps a ``trust_ratio`` slot per variable, and lists the variables it has seen in
    ``_seen_variables()``.
    """

    def _set_exclusions(self, weight_decay_patterns, adaptation_patterns):
        self._wd_rule = ExclusionRule.from_config(weight_decay_patterns)
        self._adapt_rule = ExclusionRule.from_config(adaptation_patterns)

    @property
    def exclude_from_weight_decay(self):
        return self._wd_rule.patterns

    @property
    def exclude_from_layer_adaptation(self):
        return self._adapt_rule.patterns

    def uses_weight_decay(self, var) -> bool:
        return self.weight_decay > 0 and not self._wd_rule.matches(var)

    def uses_adaptation(self, var) -> bool:
        return not self._adapt_rule.matches(var)

    def get_slot_names(self):
        # A SavedModel leaves out the trust ratios (a record of the last step, not state): its
        # loader rebuilds each slot in the shape of its variable (Keras's RestoredOptimizer
        # ignores the saved shape), and the scalar would then fail to restore.
        # Imported here: this module stays free of TensorFlow for the config's sake.
        from tensorflow.python.saved_model import save_context

        names = super().get_slot_names()
        if save_context.in_save_context():
            return [name for name in names if name != "trust_ratio"]
        return names

    def trust_ratios(self, include_excluded: bool = False) -> dict:
        """{variable name: trust ratio of the last step}; only adapted variables by default."""
        return {v.name: float(self.get_slot(v, "trust_ratio").numpy()) for v in self._seen_variables()
                if include_excluded or self.uses_adaptation(v)}
