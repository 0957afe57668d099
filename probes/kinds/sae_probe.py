"""SAE probe: L1 logistic regression on pooled latent activations, a few latents weighted.

Latents firing on fewer than `min_fire_rate` of the examples are dropped, the `candidates` with the
largest standardised mean difference between the classes are kept, and an L1-penalised, class-
balanced logistic regression on their standardised activations picks the few that matter (at most
`max_latents`, the largest |coefficient|s, refitted); where the penalty leaves none, the strongest
candidate alone, Platt-scaled. Standardisation is folded into the weights.
Mean pooling is exact for it (see sae_base).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from probes.kinds.base import platt, standardisation
from probes.kinds.sae_base import SAEKind, SAEKindConfig, check_latents


class SAEProbeConfig(SAEKindConfig):
    C: float = Field(0.1, gt=0)
    max_latents: int = Field(32, ge=1)
    candidates: int = Field(512, ge=1)
    min_fire_rate: float = Field(0.01, ge=0, lt=1)
    class_weight: Literal["balanced"] | None = "balanced"


class SAEProbe(SAEKind):
    kind = "sae_probe"
    config_cls = SAEProbeConfig
    config: SAEProbeConfig
    pools: ClassVar[tuple[str, ...]] = ("mean",)

    def _l1(self, z: np.ndarray, y: np.ndarray):
        from sklearn.linear_model import LogisticRegression  # training only: serving never imports sklearn

        return LogisticRegression(l1_ratio=1.0, solver="liblinear", C=self.config.C,
                                  class_weight=self.config.class_weight, random_state=self.config.seed).fit(z, y)

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = check_latents(x, y)
        firing = np.flatnonzero((x > 0).mean(0) >= self.config.min_fire_rate)
        if not len(firing):
            raise ValueError(f"no latent fires on {self.config.min_fire_rate:.0%} of the training examples")
        pos, neg = x[y == 1][:, firing], x[y == 0][:, firing]
        spread = np.sqrt((pos.var(0) + neg.var(0)) / 2) + 1e-12
        order = np.argsort(-np.abs(pos.mean(0) - neg.mean(0)) / spread, kind="stable")
        keep = firing[np.sort(order[: self.config.candidates])]
        mean, std = standardisation(x[:, keep])
        lr = self._l1((x[:, keep] - mean) / std, y)
        coef = lr.coef_[0]
        if np.count_nonzero(coef) > self.config.max_latents:
            top = np.sort(np.argsort(-np.abs(coef), kind="stable")[: self.config.max_latents])
            keep, mean, std = keep[top], mean[top], std[top]
            lr = self._l1((x[:, keep] - mean) / std, y)
            coef = lr.coef_[0]
        nz = np.flatnonzero(coef)
        if not len(nz):  # the penalty left nothing: the single strongest candidate, Platt-scaled
            best = int(keep[np.argmax(np.isin(keep, firing[order[:1]]))])
            a, c = platt(x[:, best], y)
            self._set([best], [a], c)
            return
        w = coef[nz] / std[nz]
        self._set(keep[nz], w, lr.intercept_[0] - float(mean[nz] @ w))
