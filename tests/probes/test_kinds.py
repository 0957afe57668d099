"""Every probe kind: separates, folds standardisation exactly, round-trips, is seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from probes.kinds import PROBE_KINDS, Probe, probe_kind, register
from probes.kinds.logistic import LogisticProbe
from probes.kinds.mlp import MlpConfig, MlpProbe
from probes.kinds.sae_base import SAEKind

FAST = {"mlp": {"hidden": 16, "epochs": 40}}


def make_data(n: int = 600, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable along one direction, with per-feature offsets and scales so folding matters."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    noise = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d)
    x = noise + rng.normal(size=d) * 5 + np.outer(2 * y - 1, u) * 3
    return x.astype(np.float32), y


def fitted(kind: str, seed: int = 0, x=None, y=None) -> Probe:
    if x is None:
        x, y = make_data()
    cls = probe_kind(kind)
    probe = cls(cls.config_cls(seed=seed, **FAST.get(kind, {})))
    probe.fit(x, y)
    return probe


def unfolded_logits(kind: str, t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Score the way each kind is defined, from its stored tensors, in float64."""
    x = x.astype(np.float64)
    if kind == "diff_means":
        return t["platt"][0] * (x @ t["direction"]) + t["platt"][1]
    xs = (x - t["mean"]) / t["std"]
    if kind == "logistic":
        return xs @ t["coef"] + t["intercept"][0]
    if kind == "lat":
        return t["platt"][0] * (xs @ t["direction"]) + t["platt"][1]
    return np.maximum(xs @ t["w1"] + t["b1"], 0) @ t["w2"] + t["b2"][0]


# kinds that read activations; the SAE-feature kinds read latents (tests/probes/test_sae_kinds.py)
KINDS = sorted(k for k, cls in PROBE_KINDS.items() if not issubclass(cls, SAEKind))


def test_registry_has_all_kinds():
    assert KINDS == ["diff_means", "lat", "logistic", "mlp"]
    assert sorted(PROBE_KINDS) == [*KINDS, "sae_latent", "sae_probe"]


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(ValueError, match="unknown probe kind 'svm'; known kinds: diff_means, lat"):
        probe_kind("svm")


def test_register_refuses_a_second_class_for_a_kind():
    class Impostor(LogisticProbe):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    assert PROBE_KINDS["logistic"] is LogisticProbe


@pytest.mark.parametrize("kind", KINDS)
def test_separates_held_out_data(kind):
    x, y = make_data()
    probe = fitted(kind, x=x[:400], y=y[:400])
    assert roc_auc_score(y[400:], probe.decision_function(x[400:])) > 0.95


@pytest.mark.parametrize("kind", KINDS)
def test_folded_head_matches_unfolded_definition(kind):
    x, _ = make_data()
    probe = fitted(kind)
    head = probe.head()
    assert head.w1.dtype == torch.float32 and head.w1.device.type == "cpu"
    assert head.w1.shape[0] == x.shape[1] and head.b1.shape == (head.width,)
    got = head.logits(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, probe.decision_function(x), rtol=0, atol=0)
    want = unfolded_logits(kind, {k: v.double().numpy() for k, v in probe.tensors().items()}, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_logistic_matches_sklearn_on_standardised_inputs():
    x, y = make_data()
    probe = fitted("logistic")
    x64 = x.astype(np.float64)
    mean, std = x64.mean(0), np.maximum(x64.std(0), 1e-6)
    reference = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced").fit((x64 - mean) / std, y)
    np.testing.assert_allclose(
        probe.decision_function(x), reference.decision_function((x64 - mean) / std), atol=1e-3
    )


def test_std_floor_keeps_dead_dimensions_finite():
    x, y = make_data()
    x[:, 3] = 7.0
    head = fitted("logistic", x=x, y=y).head()
    assert torch.isfinite(head.w1).all() and torch.isfinite(head.b1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_tensors_round_trip(kind):
    x, _ = make_data()
    probe = fitted(kind)
    clone = type(probe).from_tensors(probe.config, probe.tensors())
    np.testing.assert_array_equal(clone.decision_function(x), probe.decision_function(x))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_fit(kind):
    a, b = fitted(kind).tensors(), fitted(kind).tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_changes_mlp_init():
    a, b = fitted("mlp", seed=0).tensors(), fitted("mlp", seed=1).tensors()
    assert not torch.equal(a["w1"], b["w1"])


@pytest.mark.parametrize("kind", KINDS)
def test_from_tensors_names_missing_and_unexpected(kind):
    tensors = fitted(kind).tensors()
    dropped = min(tensors)
    tensors["extra"] = tensors.pop(dropped)
    with pytest.raises(ValueError, match=rf"missing \['{dropped}'\], unexpected \['extra'\]"):
        probe_kind(kind).from_tensors(probe_kind(kind).config_cls(**FAST.get(kind, {})), tensors)


def test_from_tensors_rejects_inconsistent_d_model():
    tensors = fitted("logistic").tensors()
    tensors["std"] = tensors["std"][:-1]
    with pytest.raises(ValueError, match=r"'std' has shape \(23,\), expected \(d_model=24\)"):
        LogisticProbe.from_tensors(LogisticProbe.config_cls(), tensors)


def test_from_tensors_checks_hidden_width_against_config():
    tensors = fitted("mlp").tensors()
    with pytest.raises(
        ValueError, match=r"'w1' has shape \(24, 16\), expected \(d_model=24, hidden=64\)"
    ):
        MlpProbe.from_tensors(MlpConfig(), tensors)


def test_from_tensors_rejects_integer_tensors():
    tensors = fitted("diff_means").tensors()
    tensors["platt"] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="not float"):
        probe_kind("diff_means").from_tensors(probe_kind("diff_means").config_cls(), tensors)


def test_unfitted_probe_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        LogisticProbe().head()


@pytest.mark.parametrize("labels", [np.zeros(10), np.full(10, 2)])
def test_fit_needs_both_classes(labels):
    with pytest.raises(ValueError, match="both classes"):
        LogisticProbe().fit(np.ones((10, 3), np.float32), labels)


def test_config_refuses_typos():
    with pytest.raises(ValueError, match="hiden"):
        MlpConfig(hiden=8)
