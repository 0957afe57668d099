"""probes.data (JSONL input) and probes.recipes (leak-free splits of the shared datasets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.data import DataError, Example, Message, data_sha256, read_jsonl, write_jsonl
from probes.recipes import (
    RECIPES,
    Splits,
    datasets_dir,
    deception_splits,
    harmful_intent_splits,
    normalise,
)

# ------------------------------------------------------------------------------------------
# read_jsonl / write_jsonl / data_sha256


def _write(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_read_jsonl_roundtrip(tmp_path: Path) -> None:
    rows = [
        {"text": "hello", "label": 0, "id": 7},
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "label": True,
            "score_suffix": "yo",
            "group": "g1",
            "extra": "ignored",
        },
        {"text": "line\u2028break", "label": 1},
    ]
    p = tmp_path / "sub" / "x.jsonl"
    write_jsonl(p, rows)
    raw = p.read_text(encoding="utf-8")
    assert "\u2028" not in raw and len(raw.splitlines()) == 3
    exs = read_jsonl(p, labelled=True)
    assert exs[0] == Example(text="hello", label=0, id="7")
    assert exs[1].messages == (Message("user", "hi"), Message("assistant", "yo"))
    assert exs[1].label == 1 and exs[1].score_suffix == "yo" and exs[1].group == "g1"
    assert exs[2].text == "line\u2028break"
    # Examples write back to the same data
    write_jsonl(tmp_path / "y.jsonl", exs)
    assert read_jsonl(tmp_path / "y.jsonl", labelled=True) == exs


def test_read_jsonl_unlabelled_and_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, ['{"text": "a"}', "", "   ", '{"text": "b", "label": 1}'])
    exs = read_jsonl(p, labelled=False)
    assert [e.label for e in exs] == [None, 1]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"text": "a", "label": 0', "not valid JSON"),
        ('{"text": "a", "messages": [{"role": "user", "content": "x"}], "label": 0}', "not both"),
        ('{"label": 0}', 'add "text"'),
        ('{"text": "   ", "label": 0}', "empty"),
        ('{"messages": [{"role": "robot", "content": "x"}], "label": 0}', "role"),
        ('{"messages": [], "label": 0}', "non-empty list"),
        ('{"text": "a", "label": 2}', "0 or 1"),
        ('{"text": "a", "label": "1"}', "0 or 1"),
        ('{"text": "a"}', 'missing "label"'),
        ("[1, 2]", "JSON object"),
        ('{"text": "abc", "label": 0, "score_suffix": "zz"}', "score_suffix"),
    ],
)
def test_read_jsonl_errors_name_the_line(tmp_path: Path, bad: str, needle: str) -> None:
    p = _write(tmp_path, ['{"text": "fine", "label": 0}', "", bad])
    with pytest.raises(DataError) as e:
        read_jsonl(p, labelled=True)
    msg = str(e.value)
    assert f"{p}:3:" in msg, msg
    assert needle in msg, msg


def test_read_jsonl_empty_and_missing_file(tmp_path: Path) -> None:
    p = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="empty"):
        read_jsonl(p, labelled=False)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl", labelled=False)


def test_example_needs_exactly_one_input() -> None:
    with pytest.raises(ValueError):
        Example()
    with pytest.raises(ValueError):
        Example(text="a", messages=(Message("user", "a"),))


def test_data_sha256_stable_and_sensitive() -> None:
    a = [Example(text="x", label=0), Example(text="y", label=1)]
    assert data_sha256(a) == data_sha256(list(reversed(a)))
    assert data_sha256(a) == data_sha256([Example(text="x", label=0, id="other"), a[1]])
    assert data_sha256(a) != data_sha256([Example(text="x", label=1), a[1]])
    assert data_sha256(a) != data_sha256(a[:1])
    assert data_sha256(a) != data_sha256(a + a[:1])
    m = [Example(messages=(Message("user", "x"),), label=0), a[1]]
    assert data_sha256(a) != data_sha256(m)
    assert len(data_sha256(a)) == 64


# ------------------------------------------------------------------------------------------
# recipes on the real shared datasets


def _root() -> Path:
    try:
        return datasets_dir(None)
    except FileNotFoundError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"shared datasets not available: {e}")


@pytest.fixture(scope="module", params=["harmful_intent", "harmful_intent_v2"])
def harm(request) -> Splits:
    return RECIPES[request.param](_root(), seed=0)


@pytest.fixture(scope="module")
def decep() -> Splits:
    return deception_splits(_root(), seed=0)


def _norms(exs: list[Example]) -> set[str]:
    return {normalise(e.content_key) for e in exs}


def test_datasets_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _root()
    assert datasets_dir(str(root)) == root
    monkeypatch.setenv("LATENTWATCH_DATASETS", str(root))
    assert datasets_dir(None) == root
    monkeypatch.setenv("LATENTWATCH_DATASETS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LATENTWATCH_DATASETS"):
        datasets_dir(None)


def test_recipes_mapping() -> None:
    assert RECIPES["harmful_intent"] is harmful_intent_splits and RECIPES["deception"] is deception_splits
    v2 = {k: (f.func, f.keywords) for k, f in RECIPES.items() if k.endswith("_v2")}
    assert v2 == {"harmful_intent_v2": (harmful_intent_splits, {"question_sets": True, "augment": True}),
                  "deception_v2": (deception_splits, {"qa_train": True})}


def test_v2_question_sets_keep_each_sub_topic_on_one_side() -> None:
    """HarmfulQA is one template over many sub-topics: a sub-topic on both sides would teach the frame."""
    import json

    v2 = RECIPES["harmful_intent_v2"](_root(), seed=0)
    side_of = {e.id: side for side, rows in (("dev", v2.train + v2.val), ("test", v2.test)) for e in rows}
    for name in ("catqa", "harmfulqa"):
        rows = [json.loads(line) for line in (_root() / name / f"{name}.jsonl").open()]
        sides: dict[str, set[str]] = {}
        for r in rows:
            if r["id"] in side_of:  # de-duplication may drop a few
                sides.setdefault(r["category"], set()).add(side_of[r["id"]])
        assert len(sides) > 40 and all(len(v) == 1 for v in sides.values()), name
        assert v2.eval_sets[name] and all(e.label == 1 and e.source == name for e in v2.eval_sets[name])
    assert v2.eval_sets["nq_open"] and all(e.label == 0 for e in v2.eval_sets["nq_open"])
    assert {e.source for e in v2.train} >= {"catqa", "harmfulqa", "nq_open"}
    v1 = harmful_intent_splits(_root(), seed=0)  # the shipped pack's recipe is unchanged by v2
    assert not {e.source for e in v1.train + v1.val + v1.test} & {"catqa", "harmfulqa", "nq_open"}


def test_v2_variants_train_beside_their_rows_and_never_calibrate() -> None:
    from probes.recipes import DAN_TEMPLATES

    v2 = RECIPES["harmful_intent_v2"](_root(), seed=0)
    dev, held = v2.train + v2.val, v2.test + [e for rows in v2.eval_sets.values() for e in rows]
    variants = [e for e in dev if "+" in e.source]
    made = v2.info["augmented"]["rows"]
    assert made == {"jailbreak_wrapped/benign": 150, "jailbreak_wrapped/harmful": 150,
                                               "repeated/benign": 150, "repeated/harmful": 150}
    assert len(variants) == sum(made.values())
    originals = {e.id: e for e in dev}
    for e in variants:
        base = originals[e.id.split("+")[0]]
        assert e.group == base.group and e.label == base.label and base.text in e.text
        assert e.source in (f"{base.source}+jailbreak_wrapped", f"{base.source}+repeated")
        assert not any(t in e.id for t in DAN_TEMPLATES)  # the dan_wrapped eval set's wrappers stay unseen
    assert not {e.group for e in variants} & {e.group for e in held}
    assert not any("+" in e.source for e in v2.calibration["dev_benign"])
    future = [e for e in dev if e.source == "tense_reformulation/future"]
    assert future and not {e.group for e in future} & {e.group for e in v2.eval_sets["future_tense"]}


def test_deception_v2_trains_on_qa_questions_it_is_never_tested_on() -> None:
    v2 = RECIPES["deception_v2"](_root(), seed=0)
    dev_qa = [e for e in v2.train + v2.val if e.source == "liedetector_qa"]
    assert len(dev_qa) > 3000 and {e.label for e in dev_qa} == {0, 1}
    assert not {e.group for e in dev_qa} & {e.group for e in v2.test}
    assert v2.test == v2.eval_sets["liedetector_qa"] and all(e.source == "liedetector_qa" for e in v2.test)
    assert any(e.source == "repe_facts/instructed_pairs" for e in v2.train)


def test_harm_no_text_leak(harm: Splits) -> None:
    trainval = _norms(harm.train + harm.val)
    held = harm.test + [e for v in harm.eval_sets.values() for e in v]
    leaked = [e.text for e in held if normalise(e.content_key) in trainval]
    assert not leaked, leaked[:5]
    assert not _norms(harm.train) & _norms(harm.val)
    # calibration sets are the benign training rows (scored out of fold), never test rows
    test_norms = _norms(held)
    for name, rows in harm.calibration.items():
        assert rows and all(e.label == 0 for e in rows), name
        assert not _norms(rows) & test_norms, name
        assert _norms(rows) <= trainval, name


def test_harm_groups_never_straddle(harm: Splits) -> None:
    side: dict[str, str] = {}
    parts = [("train", harm.train), ("val", harm.val), ("test", harm.test)]
    parts += [("test", v) for v in harm.eval_sets.values()]
    for name, rows in parts:
        for e in rows:
            assert e.group, e
            assert side.setdefault(e.group, name) == name, (e.group, e.text)


def test_harm_pairs_same_side(harm: Splits) -> None:
    everything = harm.train + harm.val + harm.test + harm.eval_sets["xstest_unsafe"]
    where = {e.id: "test" for e in harm.test + harm.eval_sets["xstest_unsafe"]}
    where.update({e.id: "train" for e in harm.train})
    where.update({e.id: "val" for e in harm.val})
    # JBB harmful/benign pairs share an id stem
    jbb = [i for i in where if i.startswith("jbb_") and "+" not in i]  # not the v2 variants
    stems = {i.rsplit("_", 1)[0] for i in jbb}
    assert len(stems) == 100
    for s in stems:
        sides = {where[i] for i in (f"{s}_harmful", f"{s}_benign") if i in where}
        assert len(sides) == 1, s
    # XSTest: same upstream position in a safe block and its contrast block
    xs = {e.id: e for e in everything if e.source == "xstest"}
    unsafe = [e for e in xs.values() if e.label == 1]
    assert unsafe
    for e in unsafe:
        partner = f"xstest_{int(e.id.split('_')[1]) - 25}"
        if partner in xs:  # the partner may have been de-duplicated away
            assert xs[partner].group == e.group
            assert where[partner] == where[e.id], (e.text, xs[partner].text)
    # train-side XSTest contrasts teach question-form harm; test-side ones stay held out
    assert any(e.source == "xstest" and e.label == 1 for e in harm.train)
    assert not any(e.source == "xstest" and e.label == 1 for e in harm.test)


def test_harm_jailbreak_rows_only_held_out(harm: Splits) -> None:
    jb_names = [k for k in harm.eval_sets if k.startswith("jbb_artifacts/")]
    assert sorted(jb_names) == sorted(
        [
            "jbb_artifacts/GCG",
            "jbb_artifacts/JBC",
            "jbb_artifacts/prompt_with_random_search",
            "jbb_artifacts/DSN",
        ]
    )
    trainval_sources = {e.source for e in harm.train + harm.val}
    v2 = {"catqa", "harmfulqa", "nq_open", "tense_reformulation/future"} \
        if harm.info["recipe"] == "harmful_intent_v2" else set()
    trainval_sources = {s.split("+")[0] for s in trainval_sources}  # a variant names its row's source
    assert trainval_sources <= {"jbb_behaviors", "advbench", "harmbench", "xstest", "alpaca", *v2}
    test_groups = {e.group for e in harm.test}
    for name in jb_names + ["future_tense", "dan_wrapped"]:
        rows = harm.eval_sets[name]
        assert rows, name
        assert all(e.label == 1 for e in rows), name
        assert {e.group for e in rows} <= test_groups, name
        assert len(_norms(rows)) == len(rows), f"{name} has duplicate texts"
    assert 80 <= len(harm.eval_sets["dan_wrapped"]) <= 100
    assert all(len(e.text) > 500 for e in harm.eval_sets["dan_wrapped"])


def test_harm_counts_sane(harm: Splits) -> None:
    info = harm.info
    n_tr, n_va, n_te = len(harm.train), len(harm.val), len(harm.test)
    total = n_tr + n_va + n_te
    assert 0.5 < n_tr / total < 0.7 and 0.12 < n_va / total < 0.28 and 0.12 < n_te / total < 0.28
    for split in (harm.train, harm.val, harm.test):
        pos = sum(e.label == 1 for e in split)
        assert 100 < pos < len(split) / 2
        assert {e.label for e in split} == {0, 1}
    assert info["dedup"]["removed_total"] > 0  # JBB overlaps AdvBench and HarmBench
    assert len({normalise(e.text) for e in harm.train + harm.val + harm.test}) == total
    assert set(harm.eval_sets) >= {
        "test_harmful",
        "alpaca",
        "jbb_benign",
        "xstest_safe",
        "xstest_unsafe",
        "future_tense",
        "dan_wrapped",
    }
    assert all(
        e.label == 0 for k in ("alpaca", "jbb_benign", "xstest_safe") for e in harm.eval_sets[k]
    )
    assert not any(e.source == "harmbench" and "\n\n---\n\n" in e.text for e in harm.train)


def test_harm_deterministic_and_seeded(harm: Splits) -> None:
    recipe = RECIPES[harm.info["recipe"]]
    again = recipe(_root(), seed=0)
    assert [e.id for e in again.train] == [e.id for e in harm.train]
    assert {k: [e.id for e in v] for k, v in again.eval_sets.items()} == {
        k: [e.id for e in v] for k, v in harm.eval_sets.items()
    }
    other = recipe(_root(), seed=1)
    assert {e.id for e in other.test} != {e.id for e in harm.test}
    assert data_sha256(other.train) != data_sha256(harm.train)


def test_deception_pairs_and_leaks(decep: Splits) -> None:
    assert decep.train and decep.val
    for rows in (decep.train, decep.val):
        by_fact: dict[str, list[Example]] = {}
        for e in rows:
            by_fact.setdefault(e.group, []).append(e)
        for g, pair in by_fact.items():
            assert sorted(e.label for e in pair) == [0, 1], g
            assert len({e.messages[-1].content for e in pair}) == 1, g  # type: ignore[index]
            assert {e.messages[0].content.split()[3] for e in pair} == {"honest", "dishonest"}  # type: ignore[index]
    assert not {e.group for e in decep.train} & {e.group for e in decep.val}
    for e in decep.train + decep.val:
        assert e.score_suffix and e.final_content.endswith(e.score_suffix)
    assert decep.calibration == {"dev_honest": [e for e in decep.train + decep.val if e.label == 0]}
    qa = decep.eval_sets["liedetector_qa"]
    assert 0 < len(qa) <= 1000 and decep.info["caps"]["max_eval"] == 1000
    assert {e.label for e in qa} == {0, 1}
    for e in qa:
        assert e.messages is not None and [m.role for m in e.messages] == ["user", "assistant"]
        assert e.score_suffix == e.messages[1].content and "Assistant:" not in e.messages[0].content
    assert not _norms(decep.train + decep.val) & _norms(qa)
    again = deception_splits(_root(), seed=0)
    assert [e.id for e in again.train] == [e.id for e in decep.train]
    assert [e.id for e in again.test] == [e.id for e in decep.test]
    other = deception_splits(_root(), seed=3)
    assert {e.id for e in other.val} != {e.id for e in decep.val}
