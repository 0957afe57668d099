"""L2 logistic regression on standardised activations: the default, strong linear baseline."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from probes.kinds.base import (
    ProbeConfig,
    ScoringHead,
    Shape,
    TensorProbe,
    check_xy,
    fold,
    standardisation,
)


class LogisticConfig(ProbeConfig):
    C: float = 1.0
    max_iter: int = 1000
    # Safety data is imbalanced (thousands of benign rows per hundred harmful): weight classes.
    class_weight: Literal["balanced"] | None = "balanced"


class LogisticProbe(TensorProbe):
    kind = "logistic"
    config_cls = LogisticConfig
    shapes: ClassVar[dict[str, Shape]] = {
        "mean": ("d_model",),
        "std": ("d_model",),
        "coef": ("d_model",),
        "intercept": (1,),
    }
    config: LogisticConfig

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression  # training only: serving never imports sklearn

        x, y = check_xy(x, y)
        mean, std = standardisation(x)
        lr = LogisticRegression(
            C=self.config.C,
            max_iter=self.config.max_iter,
            class_weight=self.config.class_weight,
            random_state=self.config.seed,
        ).fit((x - mean) / std, y)
        self._set({"mean": mean, "std": std, "coef": lr.coef_[0], "intercept": lr.intercept_})

    def head(self) -> ScoringHead:
        p = self.params64()
        return ScoringHead(*fold(p["coef"], p["intercept"], p["mean"], p["std"]))
