"""LearnerConfig: every knob of a learner, validated once, saved with its state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from .ops.backends import CHOICES as BACKEND_CHOICES

OPTIMIZERS = ("adam", "sgd")


@dataclass
class LearnerConfig:
    rank: int = 16
    alpha: Optional[float] = None  # scale c = alpha / rank; None means alpha = rank, so c = 1
    seed: int = 0
    lr: float = 1e-3
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    backend: str = "auto"
    targets: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    keep_rollback: bool = True  # keep a copy of the merged weights so rollback() is exact
    # Replicas (fastcl.distributed): None all-reduces the accumulators in every step(); N lets each
    # replica step on its own traffic and averages the replicas every N steps.
    sync_every: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.betas = tuple(self.betas)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.sync_every is not None and (not isinstance(self.sync_every, int) or isinstance(self.sync_every, bool)
                                            or self.sync_every < 1):
            raise ValueError(f"sync_every must be None (synchronous) or a positive integer, got {self.sync_every!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        d["exclude"] = list(self.exclude) if self.exclude is not None else None
        d["betas"] = list(self.betas)
        return d
