"""Leave one source out (probes.loso), and selection by it in probes.train, on a tiny Llama."""

import numpy as np
import pytest

from probes.data import Example
from probes.loso import held_out_scores, unit_folds, unit_metrics
from probes.pack import Aggregation, ProbePack
from probes.train import TrainData, TrainSpec, score_sets, train_pack
from tests.probes.test_baselines import BENIGN, HARMFUL
from tests.tiny import tiny_runner


def rows(texts, label, source, group=None):
    return [Example(text=f"{t} ({source}{i})", label=label, id=f"{source}{i}", source=source,
                    group=group(i) if group else "") for i, t in enumerate(texts)]


def test_a_held_out_source_takes_its_groups_with_it():
    """A near-duplicate filed under another source shares the held-out row's group: it leaves training too."""
    dev = (rows(["a"] * 4, 1, "advbench", lambda i: f"g{i}") + rows(["h"] * 4, 1, "harmbench", lambda i: f"g{i % 2}h")
           + rows(["b"] * 4, 0, "alpaca") + rows(["n"] * 4, 0, "nq_open"))
    dev[4:6] = [Example(text=e.text, label=1, id=e.id, source="harmbench", group=f"g{i}")
                for i, e in enumerate(dev[4:6])]
    folds = {u.name: (train, held) for u, train, held in unit_folds(dev)}
    assert list(folds) == ["advbench (harmful)", "harmbench (harmful)", "alpaca (benign)", "nq_open (benign)"]
    train, held = folds["advbench (harmful)"]
    assert [dev[i].source for i in held] == ["advbench"] * 4
    # the two harmbench rows that share advbench's groups leave with it
    assert [dev[i].id for i in train if dev[i].label == 1] == ["harmbench2", "harmbench3"]
    train, held = folds["alpaca (benign)"]
    assert {dev[i].source for i in train} == {"advbench", "harmbench", "nq_open"}


def test_a_variant_is_held_out_with_the_source_it_was_made_from():
    dev = (rows(["a"] * 3, 1, "advbench") + rows(["w"] * 3, 1, "advbench+jailbreak_wrapped")
           + rows(["h"] * 3, 1, "harmbench") + rows(["b"] * 3, 0, "alpaca")
           + rows(["v"] * 3, 0, "alpaca+jailbreak_wrapped") + rows(["n"] * 3, 0, "nq_open"))
    folds = {u.name: (train, held) for u, train, held in unit_folds(dev)}
    assert set(folds) == {"advbench (harmful)", "harmbench (harmful)", "alpaca (benign)", "nq_open (benign)"}
    _, held = folds["alpaca (benign)"]
    assert sorted({dev[i].source for i in held}) == ["alpaca", "alpaca+jailbreak_wrapped"]


def test_the_only_source_of_a_label_cannot_be_held_out():
    dev = rows(["a"] * 3, 1, "advbench") + rows(["b"] * 3, 0, "alpaca") + rows(["n"] * 3, 0, "nq_open")
    with pytest.raises(ValueError, match=r"cannot hold out advbench \(harmful\): .* no row of label 1 is left"):
        unit_folds(dev)


def test_metrics_read_each_unit_against_every_held_out_row_of_the_other_label():
    dev = rows(["x"] * 2, 1, "p1") + rows(["x"] * 2, 1, "p2") + rows(["x"] * 100, 0, "n1") + rows(["x"] * 2, 0, "n2")
    folds = unit_folds(dev)
    scores = np.r_[[0.9, 0.95], [0.2, 0.99], np.linspace(0, 0.5, 100), [0.3, 0.97]]
    out = unit_metrics(dev, folds, scores)
    # the benign scores' 1% FPR threshold sits just above 0.5 (one benign row of 102 may pass: 0.97)
    assert out["units"]["p1 (harmful)"] == {"n_pos": 2, "auroc": pytest.approx(101 / 102),
                                            "recall_at_1pct_fpr": 1.0}
    assert out["units"]["p2 (harmful)"]["recall_at_1pct_fpr"] == 0.5
    assert out["units"]["n2 (benign)"]["fpr_at_1pct_fpr"] == 0.5
    # 0.9, 0.95 and 0.99 beat all 100 n1 rows, 0.2 beats the 40 below it
    assert out["units"]["n1 (benign)"] == {"n_neg": 100, "auroc": pytest.approx(340 / 400),
                                          "fpr_at_1pct_fpr": 0.0}
    assert out["worst_unit_auroc"] == min(u["auroc"] for u in out["units"].values())


def test_held_out_scores_come_from_the_model_without_that_unit():
    dev = rows(["a"] * 3, 1, "s1") + rows(["b"] * 3, 1, "s2") + rows(["c"] * 3, 0, "s3") + rows(["d"] * 3, 0, "s4")
    folds = unit_folds(dev)
    seen = []
    scores = held_out_scores(folds, lambda train: (seen.append(set(train.tolist())) or
                                                   (lambda held: np.full(len(held), float(len(seen))))), len(dev))
    for k, (_, train, held) in enumerate(folds):
        assert seen[k] == set(train.tolist()) and set(held.tolist()).isdisjoint(seen[k])
        assert (scores[held] == k + 1).all()


def test_selection_by_held_out_source_picks_the_aggregation_through_the_bank():
    runner = tiny_runner("llama")
    dev = (rows(HARMFUL, 1, "adv") + rows(HARMFUL[::-1], 1, "hb") + rows(BENIGN, 0, "alp")
           + rows(BENIGN[::-1], 0, "nq"))
    aggregations = [{"kind": "mean"}, {"kind": "max_rolling_mean", "window": 2}, {"kind": "last"}]
    spec = TrainSpec(pack_id="tiny", hook_points=["blocks.1.resid_post", "blocks.2.resid_post"], batch_size=8,
                     folds=3, target_fpr=0.1, selection="loso", aggregations=aggregations)
    pack, table = train_pack(runner, TrainData(dev, "benign", [e for e in dev if e.label == 0]), spec,
                             progress=False)
    m = pack.manifest
    assert all({"cv_auroc", "loso_auroc", "loso_recall_at_1pct_fpr", "loso_worst_unit_auroc"} <= set(r) for r in table)
    chosen = m.provenance["selection"]["chosen"]
    assert chosen["loso_auroc"] == max(r["loso_auroc"] for r in table)
    tried = m.provenance["selection"]["aggregations"]
    assert [r["aggregation"] for r in tried] == [{"kind": "mean"}, {"kind": "max_rolling_mean", "window": 2},
                                                 {"kind": "last"}]
    best = max(tried, key=lambda r: (round(r["loso_auroc"], 4), round(r["loso_recall_at_1pct_fpr"], 4)))
    assert m.aggregation == Aggregation(**best["aggregation"])
    assert m.metrics["loso"]["auroc"] == best["loso_auroc"]
    assert set(m.metrics) >= {"loso/adv (harmful)", "loso/hb (harmful)", "loso/alp (benign)", "loso/nq (benign)"}
    # Platt scaling, fitted on the same held-out scores, is folded into the head: sigmoid(a * logit + b)
    assert m.platt is not None and m.platt.a > 0 and m.platt.n == len(dev)
    raw = ProbePack(m.model_copy(update={"platt": None}), pack.probe)
    p_raw = score_sets(runner, raw, {"d": dev})["d"].astype(np.float64)
    z = np.log(p_raw / (1 - p_raw))
    np.testing.assert_allclose(score_sets(runner, pack, {"d": dev})["d"],
                               1 / (1 + np.exp(-(m.platt.a * z + m.platt.b))), rtol=1e-4, atol=1e-6)

    # the bank's scores for a held-out unit are its own model's, under that aggregation
    from probes.train import sweep
    found, _ = sweep(runner, TrainData(dev, "benign", []), spec, progress=False)
    unit, _, held = found["units"][0]
    unit_pack = ProbePack(m, found["unit_probes"][0])
    held_rows = [dev[i] for i in held]
    s = score_sets(runner, unit_pack, {"h": held_rows})["h"]
    others = np.concatenate([score_sets(runner, ProbePack(m, p), {"b": [dev[i] for i in h if dev[i].label == 0]})["b"]
                             for p, (_, _, h) in zip(found["unit_probes"], found["units"])])
    expect = np.mean(s[:, None] > others[None, :]) + 0.5 * np.mean(s[:, None] == others[None, :])
    assert m.metrics[f"loso/{unit.name}"]["auroc"] == pytest.approx(expect, abs=1e-6)
