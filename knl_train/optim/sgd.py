"""Momentum SGD with L2 weight decay, as in Goyal et al. 2017, as a legacy Keras optimizer.

The baseline the large-batch papers compare LARS against ("Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour", arXiv:1706.02677). Their weight decay is the gradient of an L2
term in the loss, ``l(x, w) = λ/2·‖w‖² + ε(x, w)`` (§3, eq. 8), so it enters the gradient and
from there the momentum buffer. Per variable ``w`` with gradient ``g``, momentum ``m``, the
scheduled learning rate ``η`` and weight decay ``λ``::

    v ← m·v + η·(g + λ·w)                      (Goyal eq. 10, the Caffe/Caffe2 form)
    w ← w − v                 nesterov:  w ← w − (m·v + η·(g + λ·w))

Goyal's reference form (eq. 9) keeps ``η`` outside the buffer, ``u ← m·u + (g + λ·w)``,
``w ← w − η·u``; the two agree while ``η`` is constant and, when ``η`` changes, the "momentum
correction" ``m·η_t/η_{t−1}`` (their Remark 2; ``schedules.WarmupMomentumCorrection``, passed
as ``momentum``) turns this form into eq. 9. We keep ``η`` inside because it is the convention
of Keras's SGD (``ResourceApplyKerasMomentum``: the slot ``momentum`` holds ``−v``) and of the
LARS ``you`` variant (lars.py, Intel Caffe), which this optimizer equals with trust ratio 1:
so a comparison between them differs only in the trust ratio, and with ``λ = 0`` this is
Keras's ``tf.keras.optimizers.legacy.SGD`` step for step (same kernels, same slots, so its
checkpoints restore). With ``momentum = 0`` there is no slot: ``w ← w − η·(g + λ·w)``.

Which variables decay: the rules of :mod:`knl_train.optim.exclusion`, as LARS and LAMB apply
them. ``None`` means ``["@rank<=1"]``: BN γ/β and biases get no weight decay. Goyal et al.
exclude the BN coefficients γ/β (§5.1); Jia et al. 2018 (arXiv:1807.11205) and He et al.'s
"Bag of Tricks" (arXiv:1812.01187, "no bias decay") exclude BN γ/β and biases, as do Google's
TPU LARS ResNet-50 (``skip_list`` ``batch_normalization``, ``bias``), MoCo v3 (rank <= 1) and
You's lab (NUS); PaddlePaddle#26733 measured +1-2 points of ResNet-50 top-1 at 2K-16K from
excluding both under LARS (lars.md §0.8, §2.4, §2.9). ``[]`` decays everything, as plain Caffe
does (the Codreanu recipe).

Sparse gradients (IndexedSlices, e.g. an Embedding's): a variable that decays takes the dense
step, since ``λ·w`` is dense (every row decays every step); one that does not takes Keras's
sparse step, touching only the gathered rows, exactly as Keras's SGD.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from knl_train.optim.exclusion import RANK_LE_1, ExclusionRule
from knl_train.optim.keras_names import SavedAsBase, registered
from knl_train.optim.schedules import ScheduledMomentum


@registered
class SGD(SavedAsBase, ScheduledMomentum, tf.keras.optimizers.legacy.Optimizer):
    """Momentum SGD with L2 weight decay in the gradient and the LARS exclusion rules.

    Args:
      learning_rate: float >= 0 or a ``LearningRateSchedule`` of the step.
      momentum: float in [0, 1], or a schedule of the step (momentum correction, whose values
        exceed 1 during a warmup from 0). 0 means plain SGD without a momentum slot.
      nesterov: Nesterov momentum, as Keras's SGD.
      weight_decay: λ >= 0, added to the gradient as ``λ·w``.
      exclude_from_weight_decay: exclusion rule (:mod:`knl_train.optim.exclusion`); ``None``
        means ``["@rank<=1"]``, ``[]`` nothing.
      name, **kwargs: as for any legacy Keras optimizer (``clipnorm``, ``clipvalue``,
        ``global_clipnorm``, ``decay``, ``lr``).

    Defaults are Keras's SGD's (lr 0.01, no momentum) plus no weight decay, so ``SGD()`` is a
    drop-in for it.
    """

    _HAS_AGGREGATE_GRAD = True

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        exclude_from_weight_decay: Optional[Sequence[str]] = None,
        name: str = "SGD",
        **kwargs,
    ):
        learning_rate = kwargs.pop("lr", learning_rate)
        if isinstance(learning_rate, (int, float)) and learning_rate < 0:
            raise ValueError(f"SGD: learning_rate must be >= 0, got {learning_rate}")
        if not callable(momentum) and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1], got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("decay", self._initial_decay)
        self._set_momentum(momentum)
        self._use_momentum = self._momentum_schedule is not None or momentum > 0
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self._wd_rule = ExclusionRule.from_config(exclude_from_weight_decay)

    @property
    def exclude_from_weight_decay(self):
        return self._wd_rule.patterns

    def uses_weight_decay(self, var) -> bool:
        return self.weight_decay > 0 and not self._wd_rule.matches(var)

    # ---- Keras optimizer plumbing -------------------------------------------------------------
    def _create_slots(self, var_list):
        if self._use_momentum:
            for var in var_list:
                self.add_slot(var, "momentum")

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        coef = apply_state[(var_device, var_dtype)]
        coef["momentum"] = self._momentum(var_dtype)
        coef["weight_decay"] = tf.constant(self.weight_decay, dtype=var_dtype)

    def _coefficients(self, var, apply_state):
        var_device, var_dtype = var.device, var.dtype.base_dtype
        return (apply_state or {}).get((var_device, var_dtype)) or self._fallback_apply_state(
            var_device, var_dtype)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        coef = self._coefficients(var, apply_state)
        # The L2 term's gradient (Goyal eq. 8): g ← g + λ·w, unless w is excluded.
        if self.uses_weight_decay(var):
            grad = grad + coef["weight_decay"] * var
        if not self._use_momentum:
            # w ← w − η·g
            return tf.raw_ops.ResourceApplyGradientDescent(
                var=var.handle, alpha=coef["lr_t"], delta=grad, use_locking=self._use_locking)
        # v ← m·v + η·g;  w ← w − v  (the slot holds −v: Keras's sign)
        return tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle, accum=self.get_slot(var, "momentum").handle, lr=coef["lr_t"],
            grad=grad, momentum=coef["momentum"], use_locking=self._use_locking,
            use_nesterov=self.nesterov)

    def _resource_apply_sparse_duplicate_indices(self, grad, var, indices, **kwargs):
        if self._use_momentum or self.uses_weight_decay(var):
            # The base class sums duplicate indices, then calls _resource_apply_sparse.
            return super()._resource_apply_sparse_duplicate_indices(grad, var, indices, **kwargs)
        # Plain SGD on the gathered rows, duplicates added one by one (as Keras's SGD).
        coef = self._coefficients(var, kwargs.get("apply_state"))
        return tf.raw_ops.ResourceScatterAdd(resource=var.handle, indices=indices,
                                             updates=-grad * coef["lr_t"])

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        if self.uses_weight_decay(var):
            # λ·w is dense: every row decays, so the step is the dense one (indices are unique).
            rows = tf.shape(var, out_type=indices.dtype)[0]
            dense = tf.math.unsorted_segment_sum(grad, indices, rows)
            return self._resource_apply_dense(dense, var, apply_state)
        coef = self._coefficients(var, apply_state)
        return tf.raw_ops.ResourceSparseApplyKerasMomentum(
            var=var.handle, accum=self.get_slot(var, "momentum").handle, lr=coef["lr_t"],
            grad=grad, indices=indices, momentum=coef["momentum"], use_locking=self._use_locking,
            use_nesterov=self.nesterov)

    # ---- config: every constructor argument (Horovod rebuilds with from_config) ---------------
    def get_config(self):
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "decay": self._initial_decay,
            "momentum": self._momentum_config(),
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "exclude_from_weight_decay": list(self.exclude_from_weight_decay),
        })
        return config


__all__ = ["SGD", "RANK_LE_1"]
