"""One SAE latent as a detector: the latent that best separates the classes, Platt-scaled.

Picked by AUROC of its pooled activation (rank-based, so scale-free) among latents that fire on at
least `min_fire_rate` of the training examples, or fixed by `latent`; then logit = a * act + c
fitted by 1-D logistic regression. Max pooling is exact for it (see sae_base).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from probes.kinds.base import platt
from probes.kinds.sae_base import SAEKind, SAEKindConfig, check_latents


class SAELatentConfig(SAEKindConfig):
    latent: int | None = Field(None, ge=0)  # None: chosen by fit
    min_fire_rate: float = Field(0.01, ge=0, lt=1)


def aurocs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of every column of x for labels y (ties count half), via the Mann-Whitney U statistic."""
    from scipy.stats import rankdata

    ranks = rankdata(x, axis=0)
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


class SAELatentProbe(SAEKind):
    kind = "sae_latent"
    config_cls = SAELatentConfig
    config: SAELatentConfig
    pools: ClassVar[tuple[str, ...]] = ("max", "mean")

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = check_latents(x, y)
        latent = self.config.latent
        if latent is None:
            score = np.where((x > 0).mean(0) >= self.config.min_fire_rate, aurocs(x, y), -np.inf)
            latent = int(np.argmax(score))  # ties: the lower index
            if not np.isfinite(score[latent]):
                raise ValueError(f"no latent fires on {self.config.min_fire_rate:.0%} of the training examples")
        elif latent >= x.shape[1]:
            raise ValueError(f"latent {latent} is past the SAE's {x.shape[1]} latents")
        a, c = platt(x[:, latent], y)
        self._set([latent], [a], c)
