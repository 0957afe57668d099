"""Cross-validated selection and out-of-fold calibration (probes.train), on a tiny Llama."""

import numpy as np
import pytest
import torch

from probes.data import Example
from probes.evaluate import threshold_at_fpr
from probes.pack import ProbePack
from probes.train import TrainData, TrainSpec, dev_folds, score_sets, sweep, train_pack
from tests.probes.test_baselines import BENIGN, HARMFUL
from tests.tiny import tiny_runner


def rows(texts, label, tag):
    return [Example(text=f"{t} ({tag}{i})", label=label, id=f"{tag}{i}") for i, t in enumerate(texts)]


def test_folds_keep_each_group_on_one_side():
    examples = [Example(text=f"t{i}", label=i % 2, group=f"g{i // 4}") for i in range(40)]
    folds = dev_folds(examples, 5, seed=0)
    assert sorted(np.concatenate([held for _, held in folds]).tolist()) == list(range(40))
    for train, held in folds:
        assert not {examples[i].group for i in train} & {examples[i].group for i in held}


def test_too_few_groups_for_the_folds_is_a_clear_error():
    examples = [Example(text=f"t{i}", label=i % 2, group=f"g{i % 6}") for i in range(30)]
    with pytest.raises(ValueError, match="needs >= 5 groups with label 0, the data has 3"):
        dev_folds(examples, 5, seed=0)


def test_threshold_rests_on_out_of_fold_scores_and_the_probe_on_all_rows():
    runner = tiny_runner("llama")
    dev = rows(HARMFUL, 1, "a") + rows(BENIGN, 0, "b") + rows(HARMFUL, 1, "c") + rows(BENIGN, 0, "d")
    unseen = rows(BENIGN, 0, "e")  # benign rows the probe never trained on
    benign = [e for e in dev if e.label == 0] + unseen
    spec = TrainSpec(pack_id="tiny", hook_points=["blocks.1.resid_post", "blocks.2.resid_post"], batch_size=4,
                     folds=3, target_fpr=0.1)
    data = TrainData(dev, "benign", benign)
    pack, table = train_pack(runner, data, spec, progress=False)
    best, _ = sweep(runner, data, spec, progress=False)

    assert [r["cv_auroc"] for r in table] and pack.manifest.hook_point == best["hook_point"]
    assert max(r["cv_auroc"] for r in table) == pack.manifest.provenance["selection"]["chosen"]["cv_auroc"]
    for name, t in best["probe"].tensors().items():  # the shipped probe is the refit on every row
        assert torch.equal(pack.probe.tensors()[name], t)

    # each training row scored by the fold model that held it out; unseen rows by the shipped probe
    expected = {e.id: s for e, s in zip(unseen, score_sets(runner, pack, {"u": unseen})["u"])}
    for k, (_, held) in enumerate(best["folds"]):
        fold_pack = ProbePack(pack.manifest, best["fold_probes"][k])
        held_benign = [dev[i] for i in held if dev[i].label == 0]
        expected |= dict(zip((e.id for e in held_benign), score_sets(runner, fold_pack, {"h": held_benign})["h"]))
    oof = np.array([expected[e.id] for e in benign])
    assert pack.manifest.threshold == pytest.approx(threshold_at_fpr(oof, 0.1)[0], abs=1e-6)
    assert pack.manifest.calibration.method == "target_fpr_out_of_fold"
    in_sample = score_sets(runner, pack, {"b": benign})["b"]
    assert not np.allclose(in_sample, oof, atol=1e-3)  # the rule matters on this data
