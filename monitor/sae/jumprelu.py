"""JumpReLU (Gemma Scope, SAELens): a latent is ReLU(pre) where pre exceeds its own threshold, else 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from monitor.sae.base import SAE, SAEConfig, Shapes


def jump(pre: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """ReLU, then zero below the threshold (strictly above it fires), as SAELens and Gemma Scope do."""
    return pre.relu() * (pre > threshold)


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    """The thresholds are a tensor (one per latent), not config."""


class JumpReLUSAE(SAE):
    kind = "jumprelu"
    config_cls = JumpReLUConfig
    extra_shapes: ClassVar[Shapes] = {"threshold": ("d_sae",)}
    threshold: torch.Tensor  # [d_sae]

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return jump(pre, self.threshold)
