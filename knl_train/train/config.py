"""The training config: frozen dataclasses, one field per YAML key and ``--set`` override.

The optimizer, schedule and compression choices are the ``Literal`` types of ``optim/names.py``
(the lists the optimizer registry is checked against); loading imports no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

from knl_train import yamlconfig
from knl_train.errors import UserError
from knl_train.optim import names, recipes
from knl_train.train import rundir
from knl_train.yamlconfig import in_range


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/demo"
    # folder: train/<wnid>/*.JPEG + val/<wnid>/*; tfrecord: ImageNet shards (train-*, validation-*);
    # synthetic: random tensors made in place (throughput studies, no I/O).
    format: Literal["folder", "tfrecord", "synthetic"] = "folder"
    image_size: int = 32
    # Threads for decoding and augmentation on each rank (tf.data private pool); 0: the launcher
    # preset's (KNL_TRAIN_DATA_THREADS), else 1.
    threads: int = 0
    # flip: resize + flip (small images); inception: random-resized-crop + flip, eval
    # resize-shorter-side + center crop; none.
    augment: Literal["flip", "inception", "none"] = "flip"
    crop_scale: Optional[Tuple[float, float]] = None
    # TFRecord labels as stored minus this (1: TF's build_imagenet_data); None: from the metadata.
    label_offset: Optional[int] = None
    # Needed for tfrecord without knl-train metadata (1000 for ImageNet) and for synthetic.
    num_classes: Optional[int] = None
    # tfrecord: skip counting the records; synthetic: images per epoch (default 1024).
    num_examples: Optional[int] = None
    shuffle_buffer: int = 1024

    def __post_init__(self):
        in_range(self, "image_size", "shuffle_buffer", "num_classes", "num_examples", above=0)
        in_range(self, "threads", minimum=0, hint="0: the launcher preset's, else 1")


@dataclass(frozen=True)
class OptimizerConfig:
    name: names.OptimizerName = "lars"
    momentum: float = 0.9
    # Goyal / Intel Caffe: momentum x lr_t / lr_(t-1) while the LR warms up. Only for variants
    # that keep the LR inside the momentum buffer (LARS you, model_garden).
    momentum_correction: bool = False
    weight_decay: float = 5e-4
    trust_coefficient: float = 0.001
    # None: the optimizer's own default (LARS 0.0, LAMB 1e-6).
    epsilon: Optional[float] = None
    nesterov: bool = False
    variant: names.LarsVariant = "you"
    beta_1: float = 0.9
    beta_2: float = 0.999
    exclude_from_weight_decay: Optional[Tuple[str, ...]] = None
    exclude_from_layer_adaptation: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.momentum_correction and (self.name == "lamb" or (self.name == "lars" and self.variant == "tf_contrib")):
            raise ValueError(
                "momentum_correction needs the LR inside the momentum buffer: use optimizer.name=sgd, "
                f"or lars with variant you or model_garden (got name={self.name}, variant={self.variant})")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then polynomial (poly), Goyal step (step) or cosine decay.

    With ``reference_batch`` set, ``peak_lr`` and ``warmup_epochs`` are the values at that batch
    and are rescaled to the run's global batch by ``scaling`` (linear: Goyal et al.; sqrt) and
    ``warmup_scaling`` (legw: warmup epochs grow with the batch, You et al.).
    """

    kind: names.ScheduleKind = "poly"
    peak_lr: float = 2.0
    warmup_epochs: float = 1.0
    warmup_start_lr: float = 0.0
    end_lr: float = 0.0
    power: float = 2.0
    decay_over: names.DecayMode = "after_warmup"
    boundary_epochs: Tuple[float, ...] = (30.0, 60.0, 80.0)
    decay_factor: float = 0.1
    reference_batch: Optional[int] = None
    scaling: names.ScalingRule = "none"
    warmup_scaling: names.WarmupRule = "constant"

    def __post_init__(self):
        in_range(self, "reference_batch", "peak_lr", above=0)
        in_range(self, "warmup_epochs", minimum=0)


@dataclass(frozen=True)
class HorovodConfig:
    # None: Horovod's own default (128 MB, 1 ms) or what HOROVOD_FUSION_THRESHOLD /
    # HOROVOD_CYCLE_TIME already say.
    fusion_threshold_mb: Optional[float] = None
    cycle_time_ms: Optional[float] = None
    # fp16: gradients travel as float16 in the allreduce (half the bytes).
    compression: names.Compression = "none"
    # Gradient accumulation: k micro-batches per rank per optimizer update.
    backward_passes_per_step: int = 1

    def __post_init__(self):
        in_range(self, "backward_passes_per_step", above=0)
        in_range(self, "fusion_threshold_mb", "cycle_time_ms", minimum=0)


@dataclass(frozen=True)
class ThreadsConfig:
    # TF thread pools per rank. 0: what the launcher's preset exported
    # (TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS), else intra = the rank's cores
    # less data.threads, inter = 1.
    intra_op: int = 0
    inter_op: int = 0

    def __post_init__(self):
        in_range(self, "intra_op", "inter_op", minimum=0, hint="0 = automatic")


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 1
    # Also every this many minutes (mid-epoch), for long epochs under a wall-clock limit.
    every_minutes: Optional[float] = None
    keep: int = 3

    def __post_init__(self):
        in_range(self, "every_epochs", "keep", "every_minutes", above=0)


@dataclass(frozen=True)
class EvalConfig:
    # Evaluate every this many epochs; the last epoch is always evaluated.
    every_epochs: int = 1
    # Keep the decoded evaluation batches in memory after the first evaluation: true, false, or
    # auto (when this rank's share takes at most a quarter of the memory available per rank).
    cache: Literal["auto", True, False] = "auto"

    def __post_init__(self):
        in_range(self, "every_epochs", above=0)


@dataclass(frozen=True)
class GuardConfig:
    # Every this many updates (and at each epoch's end) the ranks compare weight checksums, agree
    # on non-finite losses, stop signals and timed checkpoints, and gather their step times
    # (stragglers), in one small collective.
    every: int = 20
    # A rank that makes no progress (no step, evaluation batch or checkpoint phase) for this many
    # seconds, plus the longest step so far, ends the job naming the stalled rank(s). null: off.
    stall_seconds: Optional[float] = 120.0

    def __post_init__(self):
        in_range(self, "every", above=0)
        in_range(self, "stall_seconds", above=0, hint="null turns stall detection off")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small_cnn"
    # A published recipe (knl_train.optim.recipes): its values sit under the YAML and --set.
    recipe: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Set one of the two: a fixed global batch (strong scaling) or a fixed batch per rank
    # (weak scaling: global = per_rank_batch x ranks x backward_passes_per_step). Neither: 32
    # per rank. per_rank_batch is the micro-batch a rank computes at once.
    global_batch: Optional[int] = None
    per_rank_batch: Optional[int] = None
    epochs: int = 4
    # Optimizer updates to train; when set it replaces ``epochs`` (the schedule spans them).
    steps: Optional[int] = None
    precision: Literal["fp32", "mixed_bf16"] = "fp32"
    label_smoothing: float = 0.0
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1234
    # Op determinism (tf.config.experimental.enable_op_determinism): bit-reproducible runs and
    # exact resume, at some speed.
    deterministic: bool = False
    run_dir: str = "runs/demo"
    # Rank 0 prints and records a metrics line every this many optimizer updates (each costs a
    # few milliseconds of TensorBoard and trust-ratio writing).
    log_every: int = 20
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        in_range(self, "epochs", "log_every", above=0)
        if self.global_batch is not None and self.per_rank_batch is not None:
            raise ValueError("set global_batch or per_rank_batch, not both")
        in_range(self, "global_batch", "per_rank_batch", "steps", above=0)
        in_range(self, "label_smoothing", minimum=0, below=1)
        if not 0 <= self.seed < 2**32:  # NumPy's range: tf.keras.utils.set_random_seed seeds it too
            raise ValueError(f"seed must be an integer from 0 to {2**32 - 1}, got {self.seed}")
        rundir.validate(self.run_dir)  # the string only; rank 0 checks the file system at start

    def batch_sizes(self, world_size: int) -> Tuple[int, int]:
        """(global batch, per-rank micro-batch) on ``world_size`` ranks.

        The global batch is what one optimizer update sees: micro-batch x ranks x
        ``horovod.backward_passes_per_step``.
        """
        k = self.horovod.backward_passes_per_step
        if self.global_batch is None:
            per_rank = self.per_rank_batch or 32
            return per_rank * world_size * k, per_rank
        if self.global_batch % (world_size * k):
            what = f"the {world_size} ranks" + (f" x {k} accumulated micro-batches" if k > 1 else "")
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by {what}; "
                f"use a multiple of {world_size * k}, or set per_rank_batch instead")
        return self.global_batch, self.global_batch // (world_size * k)

    def hash(self) -> str:
        blob = json.dumps(yamlconfig.to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load(path: Optional[str], overrides=()) -> TrainConfig:
    """Read a YAML file (or nothing), apply ``key=value`` overrides, merge a recipe, validate.

    Precedence: recipe < YAML < --set.
    """
    data = yamlconfig.load_yaml(path) if path else {}
    data = yamlconfig.apply_overrides(data, overrides)
    if "guard_every" in data:  # renamed when the guard gained stall detection
        raise UserError("config field 'guard_every' is now 'guard.every' (guard: {every: N}, or "
                        "--set guard.every=N); rename it and rerun")
    if data.get("recipe"):
        data = _with_recipe(data)
    return yamlconfig.from_dict(TrainConfig, data)


def _with_recipe(data: dict) -> dict:
    base = recipes.get(str(data["recipe"])).to_config_dict()
    if "global_batch" in data or "per_rank_batch" in data:
        base.pop("global_batch", None)
    if "steps" in data:
        base.pop("epochs", None)
    return _deep_merge(base, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out

