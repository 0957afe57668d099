"""The contract every probe kind meets: fit on pooled activations, hand the bank a scoring head."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

STD_FLOOR = 1e-6


@dataclass
class ScoringHead:
    """What the detector bank evaluates for one probe, in raw activation space.

    logit = x @ w1 + b1                        when w2 is None (affine; w1 has one column)
    logit = relu(x @ w1 + b1) @ w2 + b2        otherwise (small MLP)

    Standardisation is already folded into w1/b1, so the bank never sees it.
    The probability reported to users is sigmoid(logit).
    """

    w1: torch.Tensor  # [d_model, h]
    b1: torch.Tensor  # [h]
    w2: torch.Tensor | None = None  # [h]
    b2: float = 0.0

    @property
    def width(self) -> int:
        return self.w1.shape[1]

    @property
    def d_in(self) -> int:
        return self.w1.shape[0]

    @property
    def scorer_kind(self) -> str:
        """The `monitor.scorers` kind that fuses this head on the device."""
        return "affine" if self.w2 is None else "mlp"

    def scaled(self, a: float, b: float) -> ScoringHead:
        """The head whose logit is a * logit + b (a pack's Platt scaling, folded in)."""
        if self.w2 is None:
            return ScoringHead(self.w1 * a, self.b1 * a + b)
        return ScoringHead(self.w1, self.b1, self.w2 * a, self.b2 * a + b)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Reference scoring, for tests and offline use; the bank fuses many heads instead."""
        z = x.to(self.w1.dtype) @ self.w1 + self.b1
        if self.w2 is None:
            return z[..., 0]
        return torch.relu(z) @ self.w2 + self.b2


class ProbeConfig(BaseModel):
    """Hyperparameters of one kind; stored verbatim as the pack's kind_config, so typos must fail."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0


class Probe(ABC):
    """A trained probe of one kind. Subclasses live one per file and register themselves."""

    kind: ClassVar[str]
    config_cls: ClassVar[type[ProbeConfig]]
    # Token poolings the kind trains on. For an affine head, a mean-pooled activation scores what the
    # bank's mean aggregation of its per-token logits gives, and "last" what "last" gives.
    pools: ClassVar[tuple[str, ...]] = ("mean", "last")

    def __init__(self, config: Any):
        self.config = config

    def attach(self, folder: Path | None, expect: Any = None, d_model: int | None = None) -> None:
        """Load what the probe reads besides its tensors, named in its config relative to its pack
        `folder` (an SAE kind's SAE); checked against the model fingerprint `expect`. Most kinds read
        the activations alone."""
        return None

    @abstractmethod
    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fit on pooled activations x [n, d_model] (float32) and labels y [n] in {0, 1}."""

    @abstractmethod
    def head(self) -> ScoringHead:
        """The scoring head in raw activation space (fp32, CPU)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the probe, for weights.safetensors."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, config: Any, tensors: dict[str, torch.Tensor]) -> Probe:
        """Rebuild from config and tensors written by `tensors()`; validates shapes."""

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logits for pooled activations, through the same head the bank uses."""
        with torch.no_grad():
            return self.head().logits(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


Shape = tuple[int | str, ...]


class TensorProbe(Probe):
    """A probe whose whole state is a few named fp32 tensors.

    Kinds declare `shapes` once (ints are fixed sizes, strings are named axes that must agree
    across tensors, e.g. "d_model"), and get tensors()/from_tensors() with validation for free.
    """

    shapes: ClassVar[dict[str, Shape]]

    def __init__(self, config: ProbeConfig | None = None):
        super().__init__(config if config is not None else self.config_cls())
        self._params: dict[str, torch.Tensor] | None = None
        self.d_model: int | None = None

    def axes(self) -> dict[str, int]:
        """Named axis sizes fixed by the config (e.g. the MLP's hidden width)."""
        return {}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            raise RuntimeError(f"{self.kind} probe is not fitted; call fit() or from_tensors()")
        return self._params

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def params64(self) -> dict[str, np.ndarray]:
        """Parameters as float64 arrays, so folding adds no rounding beyond the final fp32 cast."""
        return {k: v.double().numpy() for k, v in self.params.items()}

    @classmethod
    def from_tensors(cls, config: ProbeConfig, tensors: dict[str, Any]) -> TensorProbe:
        probe = cls(config)
        probe._set(tensors)
        return probe

    def _set(self, tensors: dict[str, Any]) -> None:
        want, got = set(self.shapes), set(tensors)
        if want != got:
            raise ValueError(
                f"{self.kind} probe expects tensors {sorted(want)}; "
                f"missing {sorted(want - got)}, unexpected {sorted(got - want)}"
            )
        axes = self.axes()
        params = {}
        for name, spec in self.shapes.items():
            t = torch.as_tensor(tensors[name])
            if not t.is_floating_point():
                raise ValueError(
                    f"{self.kind} probe: tensor '{name}' has dtype {t.dtype}, not float"
                )
            t = t.detach().to("cpu", torch.float32).contiguous()
            if t.dim() == len(spec):
                for axis, size in zip(spec, t.shape):
                    if isinstance(axis, str):
                        axes.setdefault(axis, size)
            expected = tuple(axes.get(a, "?") if isinstance(a, str) else a for a in spec)
            if tuple(t.shape) != expected:
                described = ", ".join(
                    f"{a}={axes.get(a, '?')}" if isinstance(a, str) else str(a) for a in spec
                )
                raise ValueError(
                    f"{self.kind} probe: tensor '{name}' has shape {tuple(t.shape)}, "
                    f"expected ({described})"
                )
            params[name] = t
        self._params = params
        self.d_model = axes["d_model"]


def check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fail early and legibly on the mistakes that otherwise surface deep inside sklearn/torch."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"fit needs x [n, d_model] and y [n]; got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fit got NaN or inf activations")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"fit needs labels with both classes 0 and 1; got {np.unique(y).tolist()}")
    return x, y.astype(np.int64)


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std; the floor keeps dead residual dimensions from blowing up."""
    return x.mean(axis=0), np.maximum(x.std(axis=0), STD_FLOOR)


def fold(
    w: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ((x - mean) / std) @ w + b into x @ w1 + b1 so the bank scores raw activations."""
    w = np.asarray(w, dtype=np.float64).reshape(len(mean), -1)
    w1 = w / std[:, None]
    b1 = np.asarray(b, dtype=np.float64).reshape(-1) - (mean / std) @ w
    return torch.from_numpy(w1).float(), torch.from_numpy(b1).float()


def platt(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1-D Platt scaling: [a, c] with sigmoid(a*p + c) calibrated on (p, y).

    Fits on z-scored projections so the fixed L2 penalty means the same thing whatever the
    projection's scale, then maps back to raw p. sklearn is imported here, not at module level,
    so that serving (which only loads packs) never pays for it.
    """
    from sklearn.linear_model import LogisticRegression

    m, s = p.mean(), max(p.std(), STD_FLOOR)
    lr = LogisticRegression().fit(((p - m) / s)[:, None], y)
    a = lr.coef_[0, 0] / s
    return np.array([a, lr.intercept_[0] - a * m])
