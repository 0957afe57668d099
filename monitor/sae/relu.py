"""The standard SAE: latents = ReLU(pre-activations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitor.sae.base import SAE, SAEConfig


@dataclass(frozen=True)
class ReLUConfig(SAEConfig):
    """Nothing beyond the shared fields: ReLU has no parameters of its own."""


class ReLUSAE(SAE):
    kind = "relu"
    config_cls = ReLUConfig

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()
