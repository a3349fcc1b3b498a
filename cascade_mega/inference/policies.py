"""Unmasking policies: which masked positions of the current block a denoising step decides.

- `fixed`: K steps per block, the most confident ceil(remaining / steps left) each step (BD3-LM).
- `threshold`: every position whose confidence reaches tau, at least the most confident one
  (Fast-dLLM's confidence-aware parallel decoding); tau > 1 decides one token per step.
- `adaptive`: the threshold rule with a cap on steps per block: at step s of at most S it decides
  at least ceil(remaining / (S - s)) positions, so confident blocks finish in a step or two and
  hard ones never take more than S (CASCADE's per-block step count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POLICIES = ("fixed", "threshold", "adaptive")


@dataclass
class Policy:
    name: str = "adaptive"
    steps: int = 4  # fixed: steps per block; adaptive: the cap
    tau: float = 0.9

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; expected one of {', '.join(POLICIES)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def choose(self, confidence: torch.Tensor, step: int) -> torch.Tensor:
        """confidence: [m] of the m still-masked positions. Returns the indices to decide."""
        m = confidence.numel()
        order = confidence.argsort(descending=True)
        if self.name == "fixed":
            return order[:math.ceil(m / max(self.steps - step, 1))]
        count = int((confidence >= self.tau).sum())
        if self.name == "adaptive":
            count = max(count, math.ceil(m / max(self.steps - step, 1)))
        return order[:max(count, 1)]
