"""SAE-feature detectors (kinds sae_probe and sae_latent): trained like probes, packed, refused when their SAE
is not the one they were fitted on, scored by the bank exactly as they were trained, and served.

A tiny random llama and a TopK SAE trained on it here (probes/sae_train.py), hand-written texts."""

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monitor.client import Client
from monitor.config import Settings
from monitor.runner import encode_all
from monitor.sae.store import files_sha256, open_sae
from probes.data import Example
from probes.kinds import SAELatentProbe, SAEProbe
from probes.kinds.sae_latent import aurocs
from probes.pack import PackError, ProbePack
from probes.sae_train import SAETrainSpec, save_sae_pack, train_sae
from probes.train import TrainData, TrainSpec, bank_scores, train_pack
from tests.monitor.server_fixtures import RunningServer
from tests.probes.test_sae_train import SPEC, TEXTS, tiny_data

LABELLED = [Example(text=t, label=int(i >= 20), group=f"row:{i}") for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def runner(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def sae_dir(runner, tmp_path_factory):
    trained = train_sae(runner, tiny_data(), SAETrainSpec(**SPEC), progress=False)
    return save_sae_pack(tmp_path_factory.mktemp("sae") / "tiny-sae", trained, pack_id="tiny-sae",
                         model=runner.fingerprint, model_id=runner.model_id)


def train(runner, sae_dir, kind, pools, pack_id):
    data = TrainData(LABELLED, "benign", [e for e in LABELLED if e.label == 0], {"all": LABELLED})
    spec = TrainSpec(pack_id=pack_id, probes=[(kind, {"min_fire_rate": 0.0})], pools=pools, sae=str(sae_dir),
                     folds=3, batch_size=8, target_fpr=0.1)
    return train_pack(runner, data, spec, progress=False)


@pytest.fixture(scope="module")
def packs(runner, sae_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for kind, pools in (("sae_probe", ["mean", "max"]), ("sae_latent", ["max"])):
        pack, table = train(runner, sae_dir, kind, pools, kind.replace("_", "-"))
        assert {r["pool"] for r in table} == ({"mean"} if kind == "sae_probe" else {"max"})
        pack.save(root / kind)
        out[kind] = root / kind
    return out


def pooled(runner, sae, pool):
    items = encode_all(runner, LABELLED, chat=True)
    return runner.capture(items, [sae.hook_point], encode=sae.encode)[(sae.hook_point, pool)]


@pytest.mark.parametrize("kind,pool", [("sae_probe", "mean"), ("sae_latent", "max")])
def test_the_bank_scores_what_the_probe_was_fitted_on(runner, packs, kind, pool):
    """Per-token latent logits aggregated by the bank equal the probe on pooled latents: no train/serve skew."""
    pack = ProbePack.load(packs[kind], runner.fingerprint)
    x = pooled(runner, pack.probe.sae, pool)
    want = 1 / (1 + np.exp(-pack.probe.decision_function(x)))
    got = bank_scores(runner, [pack], LABELLED)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert pack.manifest.aggregation.kind == pool and pack.manifest.kind == kind
    assert pack.manifest.calibration.achieved_fpr <= 0.1 and "all" in pack.manifest.metrics


def test_sae_probe_keeps_at_most_max_latents(runner, sae_dir):
    sae = open_sae(sae_dir)
    x = pooled(runner, sae, "mean")
    y = np.array([e.label for e in LABELLED])
    cfg = SAEProbe.config_cls(sae=str(sae_dir), sae_sha256=files_sha256(sae_dir), max_latents=3, min_fire_rate=0.0,
                              C=10.0)
    probe = SAEProbe(cfg)
    probe.fit(x, y)
    assert 1 <= len(probe.latents) <= 3 and len(set(probe.latents.tolist())) == len(probe.latents)
    probe.sae = sae
    assert probe.head().logits(torch.zeros(1, sae.d_in)).shape == (1,)


def test_sae_latent_picks_the_latent_with_the_best_auroc(runner, sae_dir):
    sae = open_sae(sae_dir)
    x = pooled(runner, sae, "max")
    y = np.array([e.label for e in LABELLED])
    probe = SAELatentProbe(SAELatentProbe.config_cls(sae=str(sae_dir), sae_sha256=files_sha256(sae_dir),
                                                     min_fire_rate=0.0))
    probe.fit(x, y)
    best = int(probe.latents[0])
    assert aurocs(x, y)[best] == pytest.approx(max(roc_auc_score(y, x[:, j]) for j in range(x.shape[1])))
    assert probe.weights[0] > 0


def test_pooled_residuals_are_refused_with_a_clear_error(sae_dir):
    probe = SAEProbe(SAEProbe.config_cls(sae=str(sae_dir), sae_sha256="0" * 64))
    with pytest.raises(ValueError, match="pooled latent activations"):
        probe.fit(np.array([[-1.0, 2.0], [1.0, 0.5]]), np.array([0, 1]))


def test_a_pack_whose_sae_changed_or_moved_is_refused(runner, packs, sae_dir, tmp_path):
    folder = shutil.copytree(packs["sae_probe"], tmp_path / "pack")
    moved = json.loads((folder / "manifest.json").read_text())
    moved["kind_config"]["sae"] = str(tmp_path / "nowhere")
    (folder / "manifest.json").write_text(json.dumps(moved))
    with pytest.raises(PackError, match="cannot load the SAE it reads: .*nowhere: no such file or folder"):
        ProbePack.load(folder, runner.fingerprint)

    other = shutil.copytree(sae_dir, tmp_path / "other-sae")
    m = json.loads((other / "manifest.json").read_text())
    m["metrics"] = {}  # same weights, different files: still not the SAE the pack pinned
    (other / "manifest.json").write_text(json.dumps(m))
    moved["kind_config"]["sae"] = str(other)
    (folder / "manifest.json").write_text(json.dumps(moved))
    with pytest.raises(PackError, match="are not the ones the pack was made with"):
        ProbePack.load(folder, runner.fingerprint)


def test_a_pack_at_another_hook_point_than_its_sae_is_refused(runner, packs, tmp_path):
    folder = shutil.copytree(packs["sae_latent"], tmp_path / "pack")
    m = json.loads((folder / "manifest.json").read_text())
    m["hook_point"] = "blocks.0.resid_post"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match="hook_point blocks.0.resid_post, but its SAE .* reads blocks.1.resid_post"):
        ProbePack.load(folder, runner.fingerprint)


def test_a_linear_kind_with_an_sae_or_an_sae_kind_without_one_is_refused(runner, sae_dir):
    data = TrainData(LABELLED, "benign", LABELLED[:20], {})
    with pytest.raises(ValueError, match="reads activations, not SAE latents"):
        train_pack(runner, data, TrainSpec(pack_id="x", probes=[("logistic", {})], sae=str(sae_dir)), progress=False)
    with pytest.raises(ValueError, match=r"needs an SAE \(--sae\)"):
        spec = TrainSpec(pack_id="x", probes=[("sae_probe", {})], hook_points=["blocks.1.resid_post"])
        train_pack(runner, data, spec, progress=False)


def test_a_served_feature_detector_is_listed_scored_and_shares_its_sae(runner, packs, tmp_path):
    settings = Settings(packs=[packs["sae_probe"], packs["sae_latent"]], port=0, metrics_port=0,
                        db=f"sqlite:///{tmp_path}/db.sqlite", detectors={"sae-latent": {"threshold": 0.0}})
    srv = RunningServer(settings, runner)
    try:
        (scorer, _), = srv.server.service.snapshot.bank.groups[srv.server.service.snapshot.bank.hook_points[0]].scorers
        assert len(scorer.encoders) == 1  # both read one SAE: one encoder pass
        assert list(srv.server.service.snapshot.saes) == ["tiny-sae"]
        with Client(srv.target, timeout=30) as c:
            dets = {d.id: d for d in c.list_detectors()}
            assert {dets["sae-probe"].kind, dets["sae-latent"].kind} == {"sae_feature"}
            result = c.score([TEXTS[25]])[0]
            want = bank_scores(runner, [ProbePack.load(packs[k], runner.fingerprint) for k in packs], [LABELLED[25]])
            assert [result.scores["sae-probe"], result.scores["sae-latent"]] == pytest.approx(want[0], abs=1e-5)
            summary = c.generate_text(TEXTS[25], max_new_tokens=4)
            assert set(summary.scores) == {"sae-probe", "sae-latent"}
            assert all(0 <= p <= 1 for p in summary.scores.values())
            alerts, _ = c.get_alerts(request_id=summary.request_id)
            (alert,) = [a for a in alerts if a.detector_id == "sae-latent"]
            e = alert.explanation  # an alert from a served feature detector carries tokens and its SAE's latents
            assert e.tokens and all(t.text for t in e.tokens)
            assert {x.sae_id for x in e.latents} == {"tiny-sae"} and e.latents[0].activation > 0
            activations = [x.activation for x in e.latents]
            assert activations == sorted(activations, reverse=True)
    finally:
        srv.stop()


def test_feature_detectors_sit_beside_the_linear_probe_in_the_report(runner, packs, tmp_path):
    from probes.recipes import Splits
    from probes.report import build_report_data, results_table, write_report
    from tests.monitor.server_fixtures import make_pack

    linear = ProbePack.load(make_pack(runner, tmp_path / "linear", id="linear"), runner.fingerprint)
    features = [ProbePack.load(packs[k], runner.fingerprint) for k in ("sae_probe", "sae_latent")]
    splits = Splits(train=LABELLED, val=[], test=LABELLED, eval_sets={"benign": LABELLED[:20]})
    data = build_report_data(runner, linear, splits, compare=features, baselines=False, n_heatmaps=0,
                             batch_size=8, progress=False)
    assert list(data.methods) == ["probe", "sae-probe", "sae-latent"]
    rows = {(r["eval_set"], r["method"]): r for r in results_table(data)}
    for method, pack in zip(("sae-probe", "sae-latent"), features):
        assert rows[("test", method)]["auroc"] == pytest.approx(
            roc_auc_score([e.label for e in LABELLED], bank_scores(runner, [pack], LABELLED)[:, 0]))
        assert rows[("benign", method)]["fpr_at_threshold"] is not None
    assert "sae-latent" in write_report(tmp_path / "report", data).read_text()


def test_the_cli_trains_a_feature_detector_and_reports_it_beside_a_probe(runner, sae_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from monitor import cli
    from probes.data import write_jsonl
    from tests.monitor.server_fixtures import make_pack

    monkeypatch.setattr(cli, "load_runner", lambda model, device: runner)
    write_jsonl(tmp_path / "train.jsonl", [{"text": e.text, "label": e.label} for e in LABELLED])

    def run(*args):
        return CliRunner().invoke(cli.app, [str(a) for a in args])

    got = run("train", "--data", tmp_path / "train.jsonl", "--sae", sae_dir, "--kind", "sae_latent",
              "--folds", 3, "--out", tmp_path / "latent")
    assert got.exit_code == 0, got.output
    assert "sae_latent @ blocks.1.resid_post, max pooling" in " ".join(got.output.split())
    pack = ProbePack.load(tmp_path / "latent", runner.fingerprint)
    assert not pack.manifest.enabled_by_default and pack.manifest.kind_config["sae"] == str(sae_dir)
    make_pack(runner, tmp_path / "linear", id="linear")
    got = run("eval", "--pack", tmp_path / "linear", "--data", tmp_path / "train.jsonl", "--report",
              tmp_path / "report", "--compare", tmp_path / "latent")
    assert got.exit_code == 0, got.output
    rows = (tmp_path / "report" / "results.csv").read_text()
    assert ",latent," in rows and ",probe," in rows

    for args, message in (
        (["train", "--data", tmp_path / "train.jsonl", "--sae", "nope", "--out", tmp_path / "x"],
         "--sae: nope: no such file or folder"),
        (["train", "--data", tmp_path / "train.jsonl", "--sae", sae_dir, "--hook-point", "blocks.1.resid_post",
          "--out", tmp_path / "x"], "--hook-point: an SAE-feature detector reads its SAE's hook point"),
        (["eval", "--pack", tmp_path / "linear", "--data", tmp_path / "train.jsonl", "--compare", tmp_path / "latent"],
         "--compare adds columns to the report: give --report FOLDER too"),
    ):
        got = run(*args)
        assert got.exit_code == 2 and message in " ".join(got.output.split()), got.output
