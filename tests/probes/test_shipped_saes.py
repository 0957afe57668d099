"""The SAE shipped in probes/saes and the feature detectors shipped on it, against the real SmolLM2.

The SAE's manifest records what `latentwatch sae train` measured on held-out text; here a fixed
subset of those held-out rows is re-encoded through the shipped weights and must give the recorded
variance explained. The feature detectors must be the recipe's: same training rows (data hash),
pinned to the shipped SAE's files, and off by default.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monitor.runner import encode_all
from monitor.sae.store import files_sha256, open_sae, shipped_saes_dir
from probes.data import data_sha256
from probes.pack import ProbePack, shipped_packs
from probes.recipes import RECIPES, datasets_dir
from probes.sae_train import _cut, recipe_data, reconstruction_metrics, token_activations

pytestmark = pytest.mark.slow

SAE_ID = "topk-18-resid-post-4096"
FEATURE_PACKS = ("harmful_intent_sae_probe", "harmful_intent_sae_latent")
N_HELD = 200  # held-out rows re-encoded (of ~1,400)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((shipped_saes_dir() / SAE_ID / "manifest.json").read_text())


def test_the_shipped_sae_meets_its_targets(manifest):
    held = manifest["metrics"]["held_out"]
    assert held["fve"] >= 0.8 and manifest["d_sae"] >= 4096
    assert 0 <= held["dead_fraction"] < 0.1
    assert held["next_token_loss"]["spliced"] > held["next_token_loss"]["clean"]
    assert manifest["provenance"]["cost"]["machine"]["cpu"] and manifest["provenance"]["cost"]["wall_s"] > 0
    assert (shipped_saes_dir() / SAE_ID / "sae.safetensors").stat().st_size < 5 * 2**20


def test_held_out_rows_reconstruct_as_recorded(manifest, smollm2):
    """The shipped weights are the trained ones: re-encoding held-out rows gives the recorded FVE."""
    sae = open_sae(SAE_ID, expect=smollm2.fingerprint, d_model=smollm2.d_model)
    data = recipe_data()
    assert len(data.held_out) == manifest["provenance"]["data"]["held_out"]["rows"]
    assert data_sha256(data.held_out) == manifest["provenance"]["data"]["held_out"]["sha256"]
    rows = [data.held_out[i] for i in np.random.default_rng(0).choice(len(data.held_out), N_HELD, replace=False)]
    items = sorted(_cut(encode_all(smollm2, rows, chat=True), manifest["provenance"]["params"]["max_text_tokens"]),
                   key=len)
    x = torch.cat(list(token_activations(smollm2, items, sae.hook_point, 32)))
    got = reconstruction_metrics(sae, x)
    assert got["fve"] == pytest.approx(manifest["metrics"]["held_out"]["fve"], abs=0.03)
    assert got["l0"] == pytest.approx(manifest["k"], abs=0.5)


@pytest.mark.parametrize("pack_id", FEATURE_PACKS)
def test_shipped_feature_detectors_are_the_recipes(pack_id, smollm2):
    folder, on = shipped_packs()[pack_id]
    pack = ProbePack.load(folder, expect=smollm2.fingerprint)
    m, prov = pack.manifest, pack.manifest.provenance
    assert not on and pack.probe.sae.id == SAE_ID and m.hook_point == manifest_hook_point()
    assert m.kind_config["sae"] == SAE_ID and m.kind_config["sae_sha256"] == files_sha256(shipped_saes_dir() / SAE_ID)
    splits = RECIPES[prov["recipe"]](datasets_dir(None), seed=prov["seed"])
    assert prov["data_sha256"] == data_sha256(splits.train + splits.val)
    assert m.metrics["test"]["auroc"] > 0.85 and "recall_at_1pct_fpr" in m.metrics["test"]


def manifest_hook_point() -> str:
    return json.loads((shipped_saes_dir() / SAE_ID / "manifest.json").read_text())["hook_point"]
