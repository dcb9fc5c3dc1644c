"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", arXiv:1904.00962).

Horovod 0.28 wraps only ``tf.keras.optimizers.legacy`` optimizers under Keras >= 2.11 and rebuilds
them with ``cls.from_config(opt.get_config())``, so ``get_config`` carries every constructor
argument, the exclusion lists included (the bug of tensorflow/addons#2619, lars.md §0.5).

Per variable ``w`` with gradient ``g``, at step ``t = iterations + 1`` (norms over the whole
variable, ``lr`` the scheduled learning rate, ``λ`` the weight decay):

    m ← β1·m + (1 − β1)·g                   v ← β2·v + (1 − β2)·g²
    m̂ = m / (1 − β1^t)                      v̂ = v / (1 − β2^t)
    r = m̂ / (√v̂ + ε) + λ·w                  λ = 0 if ``w`` is excluded from weight decay
    trust = ‖w‖ / ‖r‖                       1 if either norm is 0 or ``w`` is excluded from
                                            layer adaptation
    w ← w − lr·trust·r

Exclusions follow :mod:`knl_train.optim.exclusion`: by default every variable of rank <= 1
(biases, BN γ/β) gets neither weight decay nor adaptation, i.e. plain bias-corrected Adam.

Slots: ``m``, ``v`` and the scalar ``trust_ratio`` (the last step's ratio, 0 before the first
step; read them with ``trust_ratios()``).

How it runs. Per variable, two fused training kernels, one multiply and two single-pass
reductions; ``r`` lives in a per-variable work buffer (not a slot, not checkpointed: it holds
nothing from one step to the next; it costs one more copy of each such variable, ~100 MB for
ResNet-50). Norms are in the variable's dtype, float32 or float64::

    r ← λ·w                                   (zeros when λ = 0)
    ResourceApplyAdam(var=r, lr=−1)           m, v as above;  r ← r + m̂/(√v̂ + ε)
    ‖w‖², ‖r‖²                                L2Loss, no squared temporary
    ResourceApplyGradientDescent(var=w, alpha=lr·trust, delta=r)

ApplyAdam's update is ``var ← var − lr·√(1−β2^t)/(1−β1^t) · m/(√v + ε̂)``; with ``lr = −1`` and
``ε̂ = ε·√(1−β2^t)`` it adds ``m̂/(√v̂ + ε)`` (the same value, rounded differently). Variables
with neither weight decay nor adaptation skip the buffer: ApplyAdam on ``w`` with ``lr`` is
their whole update. That is about 19 reads/writes of a variable-sized array per step against
momentum SGD's 7 (read g, m, w; write m, w; a write counted twice), so a LAMB step costs about
2.7 SGD steps when memory-bound.

Variables must be float32 or float64: in float16/bfloat16 the kernel would round β2 = 0.999 to 1
and the moments would stop updating, so keep float32 master weights (Keras mixed precision).
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from knl_train.optim.exclusion import ExclusionMixin
from knl_train.optim.keras_names import SavedAsBase, registered

SUPPORTED_DTYPES = (tf.float32, tf.float64)


@registered
class LAMB(SavedAsBase, ExclusionMixin, tf.keras.optimizers.legacy.Optimizer):
    """LAMB with decoupled weight decay and separate weight-decay / adaptation exclusions.

    Args:
      learning_rate: float >= 0 or a ``LearningRateSchedule`` of the step (e.g.
        ``knl_train.optim.WarmupPolyDecay``).
      beta_1, beta_2: moment decay rates, in [0, 1).
      epsilon: > 0, added to √v̂.
      weight_decay: λ >= 0, decoupled (added to the update, not to the gradient).
      exclude_from_weight_decay, exclude_from_layer_adaptation: exclusion rules (see
        :mod:`knl_train.optim.exclusion`); ``None`` means ``["@rank<=1"]``, ``[]`` nothing.
      name, **kwargs: as for any legacy Keras optimizer (``clipnorm``, ``clipvalue``,
        ``global_clipnorm``, ``decay``).
    """

    _HAS_AGGREGATE_GRAD = True

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-6,
        weight_decay: float = 0.01,
        exclude_from_weight_decay: Optional[Sequence[str]] = None,
        exclude_from_layer_adaptation: Optional[Sequence[str]] = None,
        name: str = "LAMB",
        **kwargs,
    ):
        learning_rate = kwargs.pop("lr", learning_rate)
        if isinstance(learning_rate, (int, float)) and learning_rate < 0:
            raise ValueError(f"LAMB: learning_rate must be >= 0, got {learning_rate}")
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"LAMB: {arg} must be in [0, 1), got {value}")
        if not epsilon > 0:
            raise ValueError(f"LAMB: epsilon must be > 0, got {epsilon} (with 0, an entry whose "
                             "gradient has been exactly 0 so far, e.g. a dead ReLU's, gives 0/0)")
        if not weight_decay >= 0:
            raise ValueError(f"LAMB: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("decay", self._initial_decay)
        # Plain Python floats, turned into constants of each variable's dtype: a float64
        # variable sees β2 = 0.999 exactly, not its float32 rounding.
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.weight_decay = float(weight_decay)
        self._set_exclusions(exclude_from_weight_decay, exclude_from_layer_adaptation)
        # var.ref() -> the variable's r buffer (None where the Adam-only path needs none). Also
        # the list of variables trust_ratios() reports. A plain dict: Keras does not track it,
        # so the buffers stay out of checkpoints and optimizer.variables().
        self._r_buffers = {}

    def _seen_variables(self):
        # trust_ratios() lists these; the excluded ones always read 1 after the first step.
        return [ref.deref() for ref in self._r_buffers]

    # ---- Keras optimizer plumbing -------------------------------------------------------------
    def _create_slots(self, var_list):
        if tf.distribute.has_strategy():
            raise NotImplementedError(
                "LAMB keeps a per-variable work buffer outside tf.distribute, so it runs without "
                "a distribution strategy; distribute with Horovod (one process per rank).")
        for var in var_list:
            if var.dtype.base_dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"LAMB supports float32 and float64 variables, but {var.name} is "
                    f"{var.dtype.base_dtype.name}: its moments cannot be kept in that precision. "
                    "Keep float32 variables, e.g. with "
                    "tf.keras.mixed_precision.set_global_policy('mixed_bfloat16').")
            self.add_slot(var, "m")
            self.add_slot(var, "v")
            self.add_slot(var, "trust_ratio", initializer="zeros", shape=[])
            if var.ref() not in self._r_buffers:
                self._r_buffers[var.ref()] = self._new_r_buffer(var)

    def _new_r_buffer(self, var):
        if not (self.uses_weight_decay(var) or self.uses_adaptation(var)):
            return None
        with tf.init_scope(), tf.device(var.device):
            return tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                               name=f"{var._shared_name}/lamb_r")

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        t = tf.cast(self.iterations + 1, var_dtype)
        beta_1 = tf.constant(self.beta_1, dtype=var_dtype)
        beta_2 = tf.constant(self.beta_2, dtype=var_dtype)
        beta_2_power = tf.pow(beta_2, t)
        apply_state[(var_device, var_dtype)].update(
            beta_1=beta_1,
            beta_2=beta_2,
            beta_1_power=tf.pow(beta_1, t),
            beta_2_power=beta_2_power,
            # ε of the bias-corrected formula, as ApplyAdam's uncorrected one (module docstring).
            epsilon_hat=tf.constant(self.epsilon, dtype=var_dtype) * tf.sqrt(1 - beta_2_power),
            weight_decay=tf.constant(self.weight_decay, dtype=var_dtype),
            one=tf.constant(1, dtype=var_dtype),
            minus_one=tf.constant(-1, dtype=var_dtype),
        )

    def _resource_apply_dense(self, grad, var, apply_state=None):
        var_device, var_dtype = var.device, var.dtype.base_dtype
        coef = (apply_state or {}).get((var_device, var_dtype)) or self._fallback_apply_state(
            var_device, var_dtype)
        lr = coef["lr_t"]
        r = self._r_buffers[var.ref()]
        if r is None:
            # λ = 0, trust = 1: w ← w − lr·m̂/(√v̂ + ε), which is ApplyAdam's own update.
            return self._record(var, coef["one"],
                                self._apply_adam(var, grad, coef, target=var, rate=lr))

        adapt = self.uses_adaptation(var)
        # ‖w‖²/2 of the weights before the step (L2Loss: one pass, no squared temporary, and
        # an XLA kernel); free to overlap with the moment updates.
        w_sq = tf.nn.l2_loss(var) if adapt else None
        # r = m̂/(√v̂ + ε) + λ·w, built in r's buffer: r ← λ·w, then ApplyAdam adds m̂/(√v̂ + ε).
        if self.uses_weight_decay(var):
            decay = coef["weight_decay"] * var
        else:
            decay = tf.zeros_like(var)
        init = r.assign(decay, read_value=False)
        with tf.control_dependencies([init]):
            moments = self._apply_adam(var, grad, coef, target=r, rate=coef["minus_one"])
        with tf.control_dependencies([moments]):
            # trust = ‖w‖/‖r‖, 1 if either norm is 0 or w is excluded from adaptation
            if adapt:
                r_sq = tf.nn.l2_loss(r)
                trust = tf.where(tf.minimum(w_sq, r_sq) > 0, tf.sqrt(w_sq / r_sq), coef["one"])
            else:
                trust = coef["one"]
            # w ← w − lr·trust·r
            update = tf.raw_ops.ResourceApplyGradientDescent(
                var=var.handle, alpha=lr * trust, delta=r.value(), use_locking=self._use_locking)
        return self._record(var, trust, update)

    def _apply_adam(self, var, grad, coef, target, rate):
        """m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  target ← target − rate·m̂/(√v̂ + ε)."""
        return tf.raw_ops.ResourceApplyAdam(
            var=target.handle, m=self.get_slot(var, "m").handle, v=self.get_slot(var, "v").handle,
            beta1_power=coef["beta_1_power"], beta2_power=coef["beta_2_power"], lr=rate,
            beta1=coef["beta_1"], beta2=coef["beta_2"], epsilon=coef["epsilon_hat"], grad=grad,
            use_locking=self._use_locking)

    def _record(self, var, trust, update):
        slot = self.get_slot(var, "trust_ratio")
        return tf.group(update, slot.assign(trust, read_value=False))

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise NotImplementedError(
            f"LAMB got the gradient of {var.name} as IndexedSlices (a sparse gradient, e.g. from "
            "an Embedding or tf.gather); its trust ratio needs the norm of the whole update. "
            "Densify the gradient first: hvd.DistributedOptimizer(opt, sparse_as_dense=True), "
            "or tf.convert_to_tensor(grad) before apply_gradients.")

    # ---- config ---------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "decay": self._initial_decay,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "weight_decay": self.weight_decay,
            "exclude_from_weight_decay": list(self.exclude_from_weight_decay),
            "exclude_from_layer_adaptation": list(self.exclude_from_layer_adaptation),
        })
        return config


__all__ = ["LAMB", "SUPPORTED_DTYPES"]
