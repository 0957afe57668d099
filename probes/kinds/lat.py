"""RepE linear artificial tomography: the top principal component of paired differences.

Differences are taken uncentred, so the mean difference counts as signal; RepE instead flips
pair order at random and centres, which leaves the same second moment.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from probes.kinds.base import (
    ProbeConfig,
    ScoringHead,
    Shape,
    TensorProbe,
    check_xy,
    fold,
    platt,
    standardisation,
)


class LatConfig(ProbeConfig):
    pass


class LatProbe(TensorProbe):
    kind = "lat"
    config_cls = LatConfig
    shapes: ClassVar[dict[str, Shape]] = {
        "mean": ("d_model",),
        "std": ("d_model",),
        "direction": ("d_model",),
        "platt": (2,),
    }

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = check_xy(x, y)
        mean, std = standardisation(x)
        xs = (x - mean) / std
        rng = np.random.default_rng(self.config.seed)
        pos, neg = rng.permutation(np.flatnonzero(y == 1)), rng.permutation(np.flatnonzero(y == 0))
        k = min(len(pos), len(neg))
        diffs = torch.from_numpy(xs[pos[:k]] - xs[neg[:k]])
        direction = torch.linalg.svd(diffs, full_matrices=False).Vh[0].numpy()
        proj = xs @ direction
        if proj[y == 1].mean() < proj[y == 0].mean():
            direction, proj = -direction, -proj
        self._set({"mean": mean, "std": std, "direction": direction, "platt": platt(proj, y)})

    def head(self) -> ScoringHead:
        p = self.params64()
        a, c = p["platt"]
        return ScoringHead(*fold(a * p["direction"], [c], p["mean"], p["std"]))
