"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017) as a legacy Keras optimizer.

Horovod 0.28 wraps only ``tf.keras.optimizers.legacy`` optimizers under Keras >= 2.11, and it
rebuilds them with ``cls.from_config(opt.get_config())``; so every constructor argument,
the exclusion lists included, is in ``get_config``.

Variants (lars.md §1-§2; ``w`` weights, ``g`` gradient, ``β`` weight decay, ``η`` trust
coefficient, ``m`` momentum, ``lr`` the scheduled global rate, norms over the whole variable):

``you``           t = η‖w‖ / (‖g‖ + β‖w‖ + ε);  v ← m·v + lr·t·(g + βw);  w ← w − v
                  (Algorithm 1 of the paper; Intel Caffe; MLPerf TF2 reference)
``tf_contrib``    t = η‖w‖ / (‖g‖ + β‖w‖ + ε);  v ← m·v + g;  w ← w − lr·t·v
                  (tf.contrib.opt.LARSOptimizer: β only shrinks the ratio)
``model_garden``  g' = g + βw;  t = η‖w‖ / (‖g'‖ + ε);  v ← m·v + lr·t·g';  w ← w − v
                  (TF Model Garden / SimCLR, "classic" momentum)

t = 1 when ‖w‖ = 0 or the denominator is 0, and for variables excluded from adaptation.

``momentum`` is a float or a schedule of the step (e.g. Goyal/Intel Caffe momentum correction
during warmup). Each variable's trust ratio of the last step is kept in its scalar slot
``trust_ratio`` (0 before the first step) and read with ``trust_ratios()``. A variable excluded
from adaptation has t = 1 by definition: its slot starts at 1 and is never written.

Slot ``momentum``: the ``you`` and ``model_garden`` variants keep −v (TF's Keras-momentum
convention, so TF's ResourceApplyKerasMomentum kernel does the update); ``tf_contrib``
keeps +v as TF's ApplyMomentum did.

Two implementations of the same formulas: the fused C++ ops built by ``make env``
(``knl_train/optim/kernels``: deterministic norms, two passes over the weights) and the
pure-TF code below. ``KNL_TRAIN_LARS_KERNEL=auto|fused|tf`` chooses; ``auto`` takes the ops
when they are built, except for float16 variables and inside XLA-compiled functions. On the
fused path a step is one ``KnlLarsApplyMulti`` per variable dtype (every variable's norms in
one pass, every update in a second, the trust ratios written to their slots), so a model of
many small variables does not pay an op launch per variable; a step it cannot take whole
(a sparse gradient, a float16 variable, a distribution strategy) goes variable by variable,
through the one-variable ``KnlLarsApply`` where it can. Both ops give the same bits.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from tensorflow.python.training import gen_training_ops

from knl_train.optim import kernels
from knl_train.optim.exclusion import RANK_LE_1, ExclusionMixin
from knl_train.optim.keras_names import SavedAsBase, registered
from knl_train.optim.names import VARIANTS
from knl_train.optim.schedules import ScheduledMomentum


@registered
class LARS(SavedAsBase, ExclusionMixin, ScheduledMomentum,
           tf.keras.optimizers.legacy.Optimizer):
    """LARS with momentum, weight decay, per-variable exclusions and three published variants."""

    _HAS_AGGREGATE_GRAD = True

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        nesterov: bool = False,
        variant: str = "you",
        exclude_from_weight_decay: Optional[Sequence[str]] = None,
        exclude_from_layer_adaptation: Optional[Sequence[str]] = None,
        name: str = "LARS",
        **kwargs,
    ):
        for arg, value in (("momentum", momentum), ("weight_decay", weight_decay),
                           ("trust_coefficient", trust_coefficient), ("epsilon", epsilon)):
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"LARS: {arg} must be >= 0, got {value}")
        if variant not in VARIANTS:
            raise ValueError(f"LARS: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self._set_hyper("decay", self._initial_decay)
        self._set_momentum(momentum)
        self.weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.epsilon = float(epsilon)
        self.nesterov = bool(nesterov)
        self.variant = variant
        self._set_exclusions(exclude_from_weight_decay, exclude_from_layer_adaptation)

    # ---- Keras optimizer plumbing -------------------------------------------------------------
    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "momentum")
            self.add_slot(var, "trust_ratio", shape=[],
                          initializer="zeros" if self.uses_adaptation(var) else "ones")
            self._lars_vars.setdefault(var.ref(), var)

    @property
    def _lars_vars(self):
        # Plain dict (ref -> variable), not tracked by Keras/checkpoints: the variables are the
        # model's. Keras calls _create_slots on every eager step, so membership must be O(1).
        if "_lars_var_refs" not in self.__dict__:
            self.__dict__["_lars_var_refs"] = {}
        return self.__dict__["_lars_var_refs"]

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        coef = apply_state[(var_device, var_dtype)]
        coef["momentum"] = self._momentum(var_dtype)
        op = self._fused_op(var_dtype)
        if op is not None:
            coef["fused"] = (op, self._fused_scalars(var_dtype, coef))

    @staticmethod
    def _fused_op(var_dtype):
        """The fused op's module, or None for the pure-TF path (not built or not wanted,
        unsupported dtype, or tracing for XLA, which cannot compile a custom op)."""
        if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
            return None
        return kernels.lars_op(var_dtype)

    def _fused_scalars(self, var_dtype, coef):
        """The op's float64 scalar inputs, built once per step and dtype. A bfloat16 variable's
        update is computed in float32, so its learning rate and momentum are not rounded to
        bfloat16 first."""
        lr, m = coef["lr_t"], coef["momentum"]
        if var_dtype == tf.bfloat16:
            lr, m = self._decayed_lr(tf.float32), self._momentum(tf.float32)
        f64 = lambda x: tf.constant(x, tf.float64)  # noqa: E731
        return {"lr": tf.cast(lr, tf.float64), "momentum": tf.cast(m, tf.float64),
                "weight_decay": f64(self.weight_decay), "no_weight_decay": f64(0.0),
                "trust_coefficient": f64(self.trust_coefficient), "epsilon": f64(self.epsilon)}

    def _seen_variables(self):
        return self._lars_vars.values()

    def _trust_ratio(self, w_norm, d_norm):
        """η‖w‖ / (d + ε), or 1 where ‖w‖ or d is zero."""
        ratio = self.trust_coefficient * w_norm / (d_norm + self.epsilon)
        # Nested where: no division result is used where a norm is 0 (XLA-safe, no NaN).
        return tf.where(w_norm > 0, tf.where(d_norm > 0, ratio, tf.ones_like(ratio)),
                        tf.ones_like(ratio))

    def _distributed_apply(self, distribution, grads_and_vars, apply_state, name):
        """The whole step in one multi-variable op per dtype where it can be (see above);
        else the base class's loop over ``_resource_apply_dense``."""
        grads_and_vars = list(grads_and_vars)
        groups = self._fused_groups(grads_and_vars, apply_state)
        if groups is None:
            return super()._distributed_apply(distribution, grads_and_vars, apply_state, name)
        if tf.executing_eagerly():  # each op has run by now
            for key, pairs in groups.items():
                self._apply_multi(pairs, *apply_state[key]["fused"])
            return self.iterations.assign_add(1)
        with tf.name_scope(name or self._name):
            updates = [self._apply_multi(pairs, *apply_state[key]["fused"])
                       for key, pairs in groups.items()]
            with tf.control_dependencies(updates):
                return self.iterations.assign_add(1, read_value=False)

    def _fused_groups(self, grads_and_vars, apply_state):
        """{(device, dtype): [(grad, var), ...]} if the fused op can apply every gradient,
        else None: a sparse gradient, a dtype without the op (float16), XLA, the pure-TF path,
        a variable listed twice, or a distribution strategy (which applies per variable)."""
        if tf.distribute.has_strategy() or not apply_state:
            return None
        groups, seen = {}, set()
        for grad, var in grads_and_vars:
            key = (var.device, var.dtype.base_dtype)
            if (not isinstance(grad, tf.Tensor) or isinstance(var, tf.Tensor)
                    or var.ref() in seen or "fused" not in apply_state.get(key, {})):
                return None
            seen.add(var.ref())
            groups.setdefault(key, []).append((grad, var))
        return groups

    def _apply_multi(self, pairs, op, scalars):
        """One KnlLarsApplyMulti over variables of one dtype; it fills their trust_ratio slots."""
        grads, variables = zip(*pairs)
        adapt = [self.uses_adaptation(var) for var in variables]
        update = op.knl_lars_apply_multi(
            vars=[var.handle for var in variables],
            accums=[self.get_slot(var, "momentum").handle for var in variables],
            trust_ratio_slots=[self.get_slot(var, "trust_ratio").handle
                               for var, adapted in zip(variables, adapt) if adapted],
            grads=list(grads), lr=scalars["lr"], momentum=scalars["momentum"],
            weight_decay=scalars["weight_decay"], trust_coefficient=scalars["trust_coefficient"],
            epsilon=scalars["epsilon"], lars_variant=self.variant, nesterov=self.nesterov,
            adapt=adapt, use_weight_decay=[self.uses_weight_decay(var) for var in variables])
        constrained = [var for var in variables if var.constraint is not None]
        if not constrained:
            return update
        with tf.control_dependencies([update]):  # as the base class: constrain after the step
            return tf.group(update, *[var.assign(var.constraint(var)) for var in constrained])

    def _resource_apply_dense(self, grad, var, apply_state=None):
        var_device, var_dtype = var.device, var.dtype.base_dtype
        coef = (apply_state or {}).get((var_device, var_dtype)) or self._fallback_apply_state(
            var_device, var_dtype)
        v = self.get_slot(var, "momentum")
        if "fused" in coef:  # the formulas below in one C++ kernel (knl_train/optim/kernels)
            return self._record(var, self._apply_fused(grad, var, v, *coef["fused"]))

        lr, m = coef["lr_t"], coef["momentum"]
        wd = self.weight_decay if self.uses_weight_decay(var) else 0.0
        adapt = self.uses_adaptation(var)
        # Norms in float32 at least, whatever the variable's dtype.
        norm_dtype = tf.float64 if var_dtype == tf.float64 else tf.float32
        norm = functools.partial(_l2_norm, dtype=norm_dtype)
        one = tf.constant(1.0, norm_dtype)

        if self.variant == "model_garden":
            g = grad + tf.constant(wd, dtype=var_dtype) * var if wd else grad
            t = self._trust_ratio(norm(var), norm(g)) if adapt else one
            update = gen_training_ops.ResourceApplyKerasMomentum(
                var=var.handle, accum=v.handle, lr=lr * tf.cast(t, var_dtype), grad=g,
                momentum=m, use_locking=self._use_locking, use_nesterov=self.nesterov)
            return self._record(var, t, update)

        if adapt:
            w_norm = norm(var)
            t = self._trust_ratio(w_norm, norm(grad) + wd * w_norm)
        else:
            t = one
        scaled_lr = lr * tf.cast(t, var_dtype)
        if self.variant == "tf_contrib":
            update = gen_training_ops.ResourceApplyMomentum(
                var=var.handle, accum=v.handle, lr=scaled_lr, grad=grad, momentum=m,
                use_locking=self._use_locking, use_nesterov=self.nesterov)
            return self._record(var, t, update)
        g = grad + tf.constant(wd, dtype=var_dtype) * var if wd else grad
        update = gen_training_ops.ResourceApplyKerasMomentum(
            var=var.handle, accum=v.handle, lr=scaled_lr, grad=g, momentum=m,
            use_locking=self._use_locking, use_nesterov=self.nesterov)
        return self._record(var, t, update)

    def _apply_fused(self, grad, var, v, op, scalars):
        """One KnlLarsApply: updates var and its momentum slot, returns t."""
        wd = "weight_decay" if self.uses_weight_decay(var) else "no_weight_decay"
        return op.knl_lars_apply(
            var=var.handle, accum=v.handle, lr=scalars["lr"], momentum=scalars["momentum"],
            grad=grad, weight_decay=scalars[wd], trust_coefficient=scalars["trust_coefficient"],
            epsilon=scalars["epsilon"], lars_variant=self.variant, nesterov=self.nesterov,
            adapt=self.uses_adaptation(var))

    def _record(self, var, t, update=None):
        """Keep t in the trust_ratio slot, after (or, with the fused op, from) ``update``."""
        if not self.uses_adaptation(var):  # t is 1, as the slot already says: no op per step
            return tf.group(t) if update is None else update
        slot = self.get_slot(var, "trust_ratio")
        record = slot.assign(tf.cast(t, slot.dtype), read_value=False)
        # The fused op's t is its output, so the assignment already depends on the update.
        return record if update is None else tf.group(update, record)

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise NotImplementedError(
            f"LARS needs the whole gradient of {var.name} to compute its norm, but got "
            "IndexedSlices (e.g. from an Embedding). Densify it first: "
            "hvd.DistributedOptimizer(..., sparse_as_dense=True) or tf.convert_to_tensor(grad).")

    def get_config(self):
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "decay": self._initial_decay,
            "momentum": self._momentum_config(),
            "weight_decay": self.weight_decay,
            "trust_coefficient": self.trust_coefficient,
            "epsilon": self.epsilon,
            "nesterov": self.nesterov,
            "variant": self.variant,
            "exclude_from_weight_decay": list(self.exclude_from_weight_decay),
            "exclude_from_layer_adaptation": list(self.exclude_from_layer_adaptation),
        })
        return config


def _l2_norm(x, dtype):
    """‖x‖ in ``dtype``. L2Loss (Σx²/2) is one fused pass over x, where tf.norm writes a
    squared temporary and reads it back: a third of the memory traffic."""
    return tf.sqrt(2 * tf.nn.l2_loss(tf.cast(x, dtype)))


__all__ = ["LARS", "VARIANTS", "RANK_LE_1"]
