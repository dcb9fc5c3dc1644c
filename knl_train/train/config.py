"""The training config: frozen dataclasses, one field per YAML key and ``--set`` override."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

from knl_train import configs


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/demo"
    format: Literal["folder"] = "folder"
    image_size: int = 32
    # Threads for decoding and augmentation on each rank (tf.data private pool).
    threads: int = 1

    def __post_init__(self):
        _positive(self, "image_size", "threads")


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["lars", "sgd"] = "lars"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 0.001
    epsilon: float = 0.0
    nesterov: bool = False
    variant: Literal["you", "tf_contrib", "model_garden"] = "you"
    exclude_from_weight_decay: Optional[Tuple[str, ...]] = None
    exclude_from_layer_adaptation: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup then polynomial decay (``knl_train.optim.WarmupPolyDecay``)."""

    peak_lr: float = 2.0
    warmup_epochs: float = 1.0
    warmup_start_lr: float = 0.0
    end_lr: float = 0.0
    power: float = 2.0
    decay_over: Literal["after_warmup", "global"] = "after_warmup"

    def __post_init__(self):
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr must be > 0, got {self.peak_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small_cnn"
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Set one of the two: a fixed global batch (strong scaling) or a fixed batch per rank
    # (weak scaling: global = per_rank_batch x ranks). Neither: 32 per rank.
    global_batch: Optional[int] = None
    per_rank_batch: Optional[int] = None
    epochs: int = 4
    seed: int = 1234
    run_dir: str = "runs/demo"
    # Rank 0 prints and records a metrics line every this many steps.
    log_every: int = 10
    keep_checkpoints: int = 3
    # TF thread pools per rank; 0 = the number of cores this rank is bound to.
    intra_op_threads: int = 0
    inter_op_threads: int = 1

    def __post_init__(self):
        _positive(self, "epochs", "log_every", "keep_checkpoints")
        if self.global_batch is not None and self.per_rank_batch is not None:
            raise ValueError("set global_batch or per_rank_batch, not both")
        for name in ("global_batch", "per_rank_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("intra_op_threads and inter_op_threads must be >= 0")

    def batch_sizes(self, world_size: int) -> Tuple[int, int]:
        """(global batch, per-rank batch) on ``world_size`` ranks."""
        if self.global_batch is None:
            per_rank = self.per_rank_batch or 32
            return per_rank * world_size, per_rank
        if self.global_batch % world_size:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by the {world_size} ranks; "
                f"use a multiple of {world_size}, or set per_rank_batch instead")
        return self.global_batch, self.global_batch // world_size

    def hash(self) -> str:
        blob = json.dumps(configs.to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load(path: Optional[str], overrides=()) -> TrainConfig:
    """Read a YAML file (or nothing) and apply ``key=value`` overrides, then validate."""
    data = configs.load_yaml(path) if path else {}
    data = configs.apply_overrides(data, overrides)
    return configs.from_dict(TrainConfig, data)


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ValueError(f"{n} must be > 0, got {v}")
