"""The causal check (probes.causal) on a tiny random llama: shapes, signs, coefficient 0 as the
unsteered run bit for bit, the shared refusal matcher and judge, and the report files."""

from __future__ import annotations

import base64
import csv
import json
import re

import numpy as np
import pytest
import torch
from markupsafe import escape
from matplotlib.image import imread

from monitor.bank import Detector, DetectorBank
from monitor.generation import Generation, Sampling
from probes.baselines import PromptedJudge
from probes.causal import (
    CSV_FIELDS,
    REFUSAL_QUESTION,
    Completion,
    NotLinear,
    labelled_prompts,
    parse_coefficients,
    probe_direction,
    recipe_prompts,
    run_causal,
    sample_prompts,
    summarise,
    write_causal_report,
)
from probes.data import Example, Message
from probes.kinds.mlp import MlpConfig, MlpProbe
from probes.pack import Manifest, ProbePack, load_packs
from probes.recipes import Splits
from probes.refusal import is_refusal
from tests.monitor.server_fixtures import make_pack

COEFFICIENTS = (-2.0, 0.0, 2.0)
TOKENS = 4


def prompts(n: int, label: int) -> list[Example]:
    words = "how do I hurt someone" if label else "suggest a name for a bakery"
    return [Example(text=f"{words}, case {i}", label=label, id=f"{label}-{i}") for i in range(n)]


@pytest.fixture(scope="module")
def pack(tiny_llama, tmp_path_factory):
    [p] = load_packs([make_pack(tiny_llama, tmp_path_factory.mktemp("pack") / "toy")], expect=tiny_llama.fingerprint)
    return p


@pytest.fixture(scope="module")
def sets():
    return labelled_prompts(prompts(4, 1) + prompts(4, 0))


@pytest.fixture(scope="module")
def result(tiny_llama, pack, sets):
    return run_causal(
        tiny_llama,
        pack,
        sets,
        coefficients=COEFFICIENTS,
        prompts_per_set=3,
        max_new_tokens=TOKENS,
        batch_size=8,
        seed=0,
    )


def chats(runner, result, sets):
    """The prompts run_causal generated from, in its order, encoded as it encodes them."""
    ids = result.params["prompt_ids"]
    rows = [e for name in ids for e in sets[name] if e.id in ids[name]]
    return rows, [
        runner.encode(messages=[Message("user", e.text)], chat=True, add_generation_prompt=True) for e in rows
    ]


def test_one_point_per_set_and_coefficient_and_one_completion_per_prompt(result):
    assert [(p.set, p.coefficient) for p in result.points] == [
        (s, k) for s in ("harmful", "harmless") for k in COEFFICIENTS
    ]
    assert len(result.completions) == 2 * 3 * len(COEFFICIENTS)
    assert all(p.n == 3 for p in result.points)
    for p in result.points:
        assert p.absolute == pytest.approx(p.coefficient * result.scale)
        for x in (
            p.refusal_phrases,
            p.refusal_judge,
            p.judge_p_refused,
            p.agreement,
            p.probe_score,
            p.probe_score_steered,
        ):
            assert 0.0 <= x <= 1.0
    par = result.params
    assert result.scale > 0 and par["scale_value"] == result.scale
    assert par["coefficients"] == list(COEFFICIENTS) and par["seed"] == 0 and par["max_new_tokens"] == TOKENS
    assert par["detector"] == "toy" and par["hook_point"] == "blocks.1.resid_post"
    assert {k: len(v) for k, v in par["prompt_ids"].items()} == {"harmful": 3, "harmless": 3}


def test_steering_along_the_direction_raises_the_probe_score_it_reads(result):
    """At the probe's own hook point, +k adds k * scale * |w| to every token's logit: the score
    while steered rises with the coefficient, on both sets."""
    for name in ("harmful", "harmless"):
        steered = [result.point(name, k).probe_score_steered for k in COEFFICIENTS]
        assert steered[0] < steered[1] < steered[2], (name, steered)


def test_coefficient_zero_is_the_unsteered_run_bit_for_bit(tiny_llama, pack, result, sets):
    rows, items = chats(tiny_llama, result, sets)
    bank = DetectorBank([Detector.from_pack(pack)], device=tiny_llama.device)
    texts, aggregate = [""] * len(items), np.zeros(len(items))
    for events in Generation(tiny_llama, items, [Sampling(max_new_tokens=TOKENS)] * len(items), bank):
        for e in events:
            texts[e.row] += e.text
            aggregate[e.row] = e.aggregate[0]
    zero = [c for c in result.completions if c.coefficient == 0.0]
    assert [c.id for c in zero] == [e.id for e in rows]
    assert [c.text for c in zero] == texts
    assert np.array_equal([c.probe_score_steered for c in zero], aggregate)
    talks = [
        tiny_llama.encode(messages=[Message("user", e.text), Message("assistant", t)]) for e, t in zip(rows, texts)
    ]
    reread = [float(r.probs[0]) for r in tiny_llama.score(talks, bank, batch_size=8)]
    assert [c.probe_score for c in zero] == reread
    assert any(c.text != z.text for c in result.completions if c.coefficient != 0.0 for z in zero if z.id == c.id), (
        "steering changed no completion"
    )


def test_refusals_are_counted_by_the_shared_matcher_and_the_prompted_judge(tiny_llama, result, sets):
    assert all(c.refused_phrases == is_refusal(c.text) for c in result.completions)
    judge = PromptedJudge(tiny_llama, question=REFUSAL_QUESTION, subject="Conversation")
    some = result.completions[:4]
    prompt = {e.id: e for rows in sets.values() for e in rows}
    talks = [Example(messages=(Message("user", prompt[c.id].text), Message("assistant", c.text))) for c in some]
    assert np.allclose(judge.scores(talks), [c.judge_p_refused for c in some], atol=1e-6)


def test_summarise_counts_rates_and_agreement():
    def c(phrases, judge_p, score):
        return Completion("harmful", "x", 0.5, "p", "t", phrases, judge_p, score, score + 0.1)

    [p] = summarise([c(True, 0.9, 0.2), c(True, 0.1, 0.4), c(False, 0.5, 0.6), c(False, 0.2, 0.8)], [0.5], 10.0)
    assert (p.n, p.absolute) == (4, 5.0)
    assert p.refusal_phrases == 0.5 and p.refusal_judge == 0.5  # the judge refuses at P(yes) >= 0.5
    assert p.agreement == 0.5 and p.judge_p_refused == pytest.approx(0.425)
    assert p.probe_score == pytest.approx(0.5) and p.probe_score_steered == pytest.approx(0.6)


def test_the_prompt_sample_is_seeded_and_keeps_aligned_sets_paired():
    sets = {"harmful": prompts(10, 1), "harmless": prompts(10, 0)}
    a, b = sample_prompts(sets, 4, seed=3), sample_prompts(sets, 4, seed=3)
    assert a == b and all(len(v) == 4 for v in a.values())
    assert [e.id.split("-")[1] for e in a["harmful"]] == [e.id.split("-")[1] for e in a["harmless"]]
    assert sample_prompts(sets, 4, seed=4) != a
    assert sample_prompts(sets, 50, seed=0) == sets  # fewer rows than asked: all of them, in order


def test_recipe_prompts_are_held_out_jbb_pairs_only():
    def ex(i, label, source, group):
        return Example(text=f"row {i}", label=label, id=str(i), source=source, group=group)

    jbb = [ex(1, 1, "jbb_behaviors", "g1"), ex(2, 1, "jbb_behaviors", "g2"), ex(3, 1, "advbench", "g3")]
    benign = [ex(4, 0, "jbb_behaviors", "g2"), ex(5, 0, "jbb_behaviors", "g1"), ex(6, 0, "jbb_behaviors", "g9")]
    splits = Splits(
        train=[],
        val=[],
        test=[],
        eval_sets={"test_harmful": jbb, "jbb_benign": benign, "alpaca": [ex(7, 0, "alpaca", "g7")]},
    )
    got = recipe_prompts(splits)
    assert [e.id for e in got["harmful"]] == ["1", "2"] and [e.id for e in got["harmless"]] == ["5", "4"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.1,0.2", "include 0"),
        ("0,0.1,0.1", "repeat"),
        ("0,nan", "finite"),
        ("0,big", "not a comma-separated list"),
        (" , ", "at least one"),
    ],
)
def test_bad_coefficients_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_coefficients(text)


def test_coefficients_are_parsed_and_sorted():
    assert parse_coefficients("0.2, -0.1,0") == (-0.1, 0.0, 0.2)


def test_the_direction_is_the_linear_probes_unit_weight(tiny_llama, pack):
    bank = DetectorBank([Detector.from_pack(pack)])
    u = probe_direction(bank)
    w = pack.head().w1[:, 0].float()
    assert torch.allclose(u, w / w.norm()) and float(u.norm()) == pytest.approx(1.0)


def test_an_mlp_probe_has_no_direction_to_steer(tiny_llama, pack, tmp_path):
    config = MlpConfig(hidden=4, epochs=2)
    rng = np.random.default_rng(0)
    probe = MlpProbe(config)
    probe.fit(rng.normal(size=(40, tiny_llama.d_model)).astype(np.float32), np.arange(40) % 2)
    manifest = Manifest.model_validate(
        {**pack.manifest.model_dump(), "id": "mlp", "kind": "mlp", "kind_config": config.model_dump()}
    )
    ProbePack(manifest, probe).save(tmp_path / "mlp")
    [mlp] = load_packs([tmp_path / "mlp"])
    with pytest.raises(NotLinear, match="mlp is not a linear probe"):
        probe_direction(DetectorBank([Detector.from_pack(mlp)]))


def test_the_report_writes_csv_json_png_and_a_self_contained_page(result, tmp_path):
    page = write_causal_report(tmp_path / "out", result)
    assert page.name == "causal.html"
    rows = list(csv.DictReader((page.parent / "causal.csv").open()))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == len(result.points)
    assert float(rows[2]["probe_score_steered"]) == pytest.approx(result.points[2].probe_score_steered)
    data = json.loads((page.parent / "causal.json").read_text())
    assert data["params"]["coefficients"] == list(COEFFICIENTS) and data["scale"] == result.scale
    assert len(data["results"]) == len(result.points) and len(data["completions"]) == len(result.completions)
    png = (page.parent / "causal.png").read_bytes()
    assert png.startswith(b"\x89PNG") and imread(page.parent / "causal.png").ndim == 3
    html = page.read_text()
    [inline] = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert base64.b64decode(inline) == png
    assert not re.search(r'(src|href)="(?!data:)', html), "the page loads something from elsewhere"
    assert "Causal check: toy" in html and "blocks.1.resid_post" in html
    assert str(escape(REFUSAL_QUESTION)) in html
    assert html.count("<details>") == len(COEFFICIENTS)
