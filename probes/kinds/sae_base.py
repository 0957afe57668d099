"""What SAE-feature kinds share: they read an SAE's latents, named in their config, and hand the bank a LatentHead.

They train on pooled latent activations [n, d_sae] (`ModelRunner.capture` with the SAE's encoder)
instead of pooled residuals. Their pools are the ones under which that is exact: the bank's mean
aggregation of per-token logits w . a_t + b equals w . mean_t(a_t) + b, and for one latent with
w > 0 its max aggregation equals w * max_t(a_t) + b.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from monitor.sae import SAE, LatentHead
from probes.kinds.base import Probe, ProbeConfig


class SAEKindConfig(ProbeConfig):
    # The SAE (monitor.sae.store.resolve): a folder, relative to the pack, or the id of a shipped SAE;
    # its files' sha256 pins the exact weights the detector was fitted on.
    sae: str
    sae_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SAEKind(Probe):
    """A weighted set of latents of one SAE: logit = sum_j w_j * a_j + b."""

    config: SAEKindConfig
    TENSORS: ClassVar[tuple[str, ...]] = ("latents", "weights", "bias")

    def __init__(self, config: SAEKindConfig):
        super().__init__(config)
        self.sae: SAE | None = None
        self.latents: torch.Tensor | None = None  # int64 [k]
        self.weights: torch.Tensor | None = None  # float32 [k], in raw activation units
        self.bias: float = 0.0

    def attach(self, folder: Path | None, expect: Any = None, d_model: int | None = None) -> None:
        from monitor.sae.store import open_sae

        self.sae = open_sae(self.config.sae, folder, sha256=self.config.sae_sha256, expect=expect, d_model=d_model)

    def _set(self, latents, weights, bias: float) -> None:
        self.latents = torch.as_tensor(np.asarray(latents), dtype=torch.long)
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        self.bias = float(bias)

    def head(self) -> LatentHead:
        if self.sae is None or self.latents is None:
            raise RuntimeError(f"{self.kind} probe has no SAE or latents yet: fit() or load it from its pack")
        return LatentHead(self.sae, self.latents, self.weights, self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.latents is None:
            raise RuntimeError(f"{self.kind} probe is not fitted")
        return {"latents": self.latents, "weights": self.weights, "bias": torch.tensor([self.bias])}

    @classmethod
    def from_tensors(cls, config: SAEKindConfig, tensors: dict[str, torch.Tensor]) -> SAEKind:
        if set(tensors) != set(cls.TENSORS):
            raise ValueError(f"{cls.kind} probe expects tensors {list(cls.TENSORS)}, got {sorted(tensors)}")
        latents, weights, bias = (tensors[k] for k in cls.TENSORS)
        if latents.dtype != torch.int64 or latents.ndim != 1 or not len(latents):
            raise ValueError(f"{cls.kind} probe: 'latents' must be a non-empty 1-D int64 tensor, got "
                             f"{latents.dtype} {list(latents.shape)}")
        if not weights.is_floating_point() or list(weights.shape) != list(latents.shape):
            raise ValueError(f"{cls.kind} probe: 'weights' must be float, one per latent ({len(latents)}), got "
                             f"{weights.dtype} {list(weights.shape)}")
        if not bias.is_floating_point() or list(bias.shape) != [1]:
            raise ValueError(f"{cls.kind} probe: 'bias' must be a float tensor of shape [1], got {list(bias.shape)}")
        probe = cls(config)
        probe._set(latents, weights.float(), bias.item())
        return probe

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logits from pooled latent activations [n, d_sae] (what `fit` trains on)."""
        x = np.asarray(x, dtype=np.float64)
        return x[:, self.latents.numpy()] @ self.weights.double().numpy() + self.bias


def check_latents(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from probes.kinds.base import check_xy

    x, y = check_xy(x, y)
    if (x < 0).any():
        raise ValueError("SAE-feature kinds fit on pooled latent activations, which are >= 0; got negative values "
                         "(pooled residuals?)")
    return x, y
