"""Building steering vectors on the tiny random llama: each method's direction, orientation and scale,
several hook points in one pass, provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.domain import HookPoint
from monitor.runner import encode_all
from probes.data import Example
from probes.pack import ProbePack
from probes.steer_build import build_vector
from probes.vectors import DataFile, load_vector_pack, save_vector_pack
from tests.monitor.server_fixtures import make_pack

POINTS = [HookPoint.parse(p) for p in ("blocks.0.resid_post", "blocks.1.mlp_out", "blocks.2.resid_post")]
SHA = "0" * 64


@pytest.fixture(scope="module")
def examples(tiny_llama):
    pos = [Example(text=f"what a wonderful lovely day number {i}") for i in range(10)]
    neg = [Example(text=f"such an awful dreadful night, case {i} {'x' * (i % 3)}") for i in range(10)]
    return encode_all(tiny_llama, pos, chat=True), encode_all(tiny_llama, neg, chat=True)


@pytest.fixture(scope="module")
def acts(tiny_llama, examples):
    pos, neg = examples
    return tiny_llama.capture([*pos, *neg], POINTS, batch_size=4)


def classes(acts, point, pool="last", n=10):
    x = torch.from_numpy(acts[(point, pool)]).double()
    return x[:n], x[n:]


def build(runner, examples, **kw):
    pos, neg = examples
    kw.setdefault("hook_points", POINTS)
    return build_vector(runner, pos, neg, pack_id="t", batch_size=4, **kw)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_diff_means_is_the_difference_of_class_means(tiny_llama, examples, acts, pool):
    pack = build(tiny_llama, examples, pool=pool)
    assert list(pack.directions) == POINTS  # several hook points from one capture, in depth order
    for p in POINTS:
        pos, neg = classes(acts, p, pool)
        v = pack.directions[p]
        assert v.shape == (tiny_llama.d_model,) and v.dtype == torch.float32
        assert torch.allclose(v.double(), pos.mean(0) - neg.mean(0), atol=1e-5)
        assert (pos @ v.double()).mean() > (neg @ v.double()).mean()
    entries = {h.hook_point: h for h in pack.manifest.hook_points}
    assert all(h.separation > 0 and h.cosine_diff_means is None for h in entries.values())


def test_provenance_records_data_params_model_and_commit(tiny_llama, examples, tmp_path):
    data = [
        DataFile(role="positive", path="pos.jsonl", rows=10, sha256=SHA),
        DataFile(role="negative", path="neg.jsonl", rows=10, sha256="1" * 64),
    ]
    pack = save_vector_pack(
        build(tiny_llama, examples, data=data, description="towards joy", default_coefficient=3.0), tmp_path / "v"
    )
    m = load_vector_pack(tmp_path / "v", expect=tiny_llama.fingerprint).manifest
    assert m.model == tiny_llama.fingerprint and m.model_hint == "llama" and m.method == "diff_means"
    assert m.default_coefficient == 3.0 and m.description == "towards joy" and m.kind == "add"
    assert m.provenance.data == data and m.provenance.commit and m.provenance.created_at
    assert m.provenance.params | {"model_id": None} == {
        "method": "diff_means",
        "pool": "last",
        "input_format": "chat",
        "n_positive": 10,
        "n_negative": 10,
        "batch_size": 4,
        "model_id": None,
    }
    assert pack.manifest.vectors_sha256 == m.vectors_sha256


def test_pca_paired_is_the_top_singular_vector_of_differences_oriented_and_scaled(tiny_llama, examples, acts):
    pack = build(tiny_llama, examples, method="pca")
    assert pack.manifest.provenance.params["pca"] == "paired"
    for p in POINTS:
        pos, neg = classes(acts, p)
        delta = pos.mean(0) - neg.mean(0)
        top = np.linalg.svd((pos - neg).numpy(), full_matrices=False)[2][0]
        v = pack.directions[p].double()
        u = v / v.norm()
        assert abs(float(u @ torch.from_numpy(top))) == pytest.approx(1.0, abs=1e-5)
        assert float(u @ delta) > 0  # positives project higher, whatever sign the solver returned
        assert float(v.norm()) == pytest.approx(float(u @ delta), rel=1e-5)  # the class separation along u
        entry = next(h for h in pack.manifest.hook_points if h.hook_point == str(p))
        assert entry.cosine_diff_means == pytest.approx(float(u @ delta / delta.norm()), abs=1e-5)


def test_pca_unpaired_centres_both_classes(tiny_llama, examples):
    pos, neg = examples
    pack = build_vector(tiny_llama, pos, neg[:7], POINTS[:1], pack_id="t", method="pca", batch_size=4)
    assert pack.manifest.provenance.params["pca"] == "centred"
    acts = tiny_llama.capture([*pos, *neg[:7]], POINTS[:1], batch_size=4)
    x = torch.from_numpy(acts[(POINTS[0], "last")]).double()
    a, b = x[:10], x[10:]
    mid = (a.mean(0) + b.mean(0)) / 2
    top = torch.linalg.svd(torch.cat([a - mid, b - mid]), full_matrices=False).Vh[0]
    v = pack.directions[POINTS[0]].double()
    assert abs(float(v @ top / v.norm())) == pytest.approx(1.0, abs=1e-5)
    assert float(v @ (a.mean(0) - b.mean(0))) > 0


def test_probe_method_uses_the_probes_direction(tiny_llama, examples, acts, tmp_path):
    probe = ProbePack.load(make_pack(tiny_llama, tmp_path / "probe", hook_point="blocks.2.resid_post"))
    pack = build(tiny_llama, examples, method="probe", probe=probe, hook_points=[POINTS[2]])
    w = probe.head().w1[:, 0].double()
    v = pack.directions[POINTS[2]].double()
    assert abs(float(v @ w / (v.norm() * w.norm()))) == pytest.approx(1.0, abs=1e-5)
    pos, neg = classes(acts, POINTS[2])
    assert float(v @ (pos.mean(0) - neg.mean(0))) > 0
    params = pack.manifest.provenance.params["probe"]
    assert params["id"] == "toy" and params["hook_point"] == "blocks.2.resid_post"
    assert pack.manifest.provenance.data[-1].sha256 == probe.manifest.weights_sha256
    with pytest.raises(ValueError, match=r"probe 'toy' reads blocks\.2\.resid_post"):
        build(tiny_llama, examples, method="probe", probe=probe, hook_points=[POINTS[0]])


@pytest.mark.parametrize(
    "kw, problem",
    [
        ({"method": "repeng"}, "unknown method 'repeng'"),
        ({"pool": "max"}, "unknown pool 'max'"),
        ({"hook_points": []}, "at least one hook point"),
        ({"method": "probe"}, "the probe method takes a probe pack"),
    ],
)
def test_bad_arguments_are_refused(tiny_llama, examples, kw, problem):
    with pytest.raises(ValueError, match=problem):
        build(tiny_llama, examples, **kw)
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        build_vector(tiny_llama, examples[0], [], POINTS, pack_id="t")
