"""Difference of class means in raw space: no fitting to overfit, a robust sanity baseline."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from probes.kinds.base import ProbeConfig, ScoringHead, Shape, TensorProbe, check_xy, platt


class DiffMeansConfig(ProbeConfig):
    pass


class DiffMeansProbe(TensorProbe):
    kind = "diff_means"
    config_cls = DiffMeansConfig
    shapes: ClassVar[dict[str, Shape]] = {"direction": ("d_model",), "platt": (2,)}

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = check_xy(x, y)
        direction = x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)
        self._set({"direction": direction, "platt": platt(x @ direction, y)})

    def head(self) -> ScoringHead:
        p = self.params64()
        a, c = p["platt"]
        return ScoringHead(
            torch.from_numpy(a * p["direction"][:, None]).float(), torch.tensor([c]).float()
        )
