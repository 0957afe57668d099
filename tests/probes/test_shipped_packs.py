"""The packs shipped in probes/packs are what their recipes produce from the shared datasets.

harmful_intent is retrained at its recorded configuration (the full 66-candidate sweep takes
~10 minutes here; the refit, its fold models and so the threshold depend only on the chosen
configuration and the data). deception runs its whole recipe through the CLI.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from monitor import cli
from probes.pack import ProbePack, shipped_packs
from probes.recipes import datasets_dir, harmful_intent_splits
from probes.train import TrainData, TrainSpec, train_pack

pytestmark = pytest.mark.slow

METRICS = ("auroc", "auprc", "recall_at_1pct_fpr", "recall_at_threshold", "fpr_at_threshold")


def shipped(pack_id: str, runner) -> ProbePack:
    return ProbePack.load(shipped_packs()[pack_id][0], expect=runner.fingerprint)


def assert_same_pack(fresh: ProbePack, ref: ProbePack, sets: list[str]) -> None:
    for name, t in ref.probe.tensors().items():
        np.testing.assert_allclose(fresh.probe.tensors()[name].numpy(), t.numpy(), atol=1e-4, rtol=1e-4)
    assert fresh.manifest.threshold == pytest.approx(ref.manifest.threshold, abs=1e-3)
    assert fresh.manifest.calibration == ref.manifest.calibration
    for name in sets:
        for key in METRICS:
            assert fresh.manifest.metrics[name][key] == pytest.approx(ref.manifest.metrics[name][key], abs=0.01), \
                (name, key)


def test_harmful_intent_recipe_reproduces_the_shipped_pack(smollm2):
    ref = shipped("harmful_intent", smollm2)
    m, prov = ref.manifest, ref.manifest.provenance
    chosen = prov["selection"]["chosen"]
    splits = harmful_intent_splits(datasets_dir(None), seed=prov["seed"])
    cal = m.calibration.benign_set
    data = TrainData(splits.train + splits.val, cal, splits.calibration[cal], {"test": splits.test},
                     recipe="harmful_intent")
    spec = TrainSpec(pack_id=m.id, hook_points=[chosen["hook_point"]], probes=[(chosen["kind"], chosen["config"])],
                     pools=[chosen["pool"]], target_fpr=m.calibration.target_fpr, seed=prov["seed"],
                     folds=prov["params"]["folds"])
    fresh, _ = train_pack(smollm2, data, spec, progress=False)
    assert prov["data_sha256"] == fresh.manifest.provenance["data_sha256"]
    assert_same_pack(fresh, ref, ["test"])


def test_deception_recipe_reproduces_the_shipped_pack(smollm2, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_runner", lambda model, device: smollm2)
    result = CliRunner().invoke(cli.app, ["train", "--recipe", "deception", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    fresh, ref = ProbePack.load(tmp_path / "d"), shipped("deception", smollm2)
    assert not fresh.manifest.enabled_by_default and not ref.manifest.enabled_by_default
    assert fresh.manifest.provenance["selection"]["chosen"] == ref.manifest.provenance["selection"]["chosen"]
    assert_same_pack(fresh, ref, ["liedetector_qa"])
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["description"] == ref.manifest.description
