"""`latentwatch policy check`: the shipped examples pass in the default table format and as JSON; a
bad file prints each problem with its path and exits 2, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.monitor.cli_helpers import run

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "deploy" / "policies").glob("*.yaml"))


def test_the_examples_are_shipped():
    assert [p.name for p in SHIPPED] == ["block-harmful.yaml", "cascade.yaml", "steer-harmful.yaml"]


@pytest.mark.parametrize("policy", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_checks_as_a_table(policy, no_model):
    result = run("policy", "check", policy)
    assert result.exit_code == 0, result.output
    assert "valid, version" in result.stdout and "harmful_intent" in result.stdout


def test_json_lists_the_rules_as_they_will_run(no_model):
    result = run("policy", "check", ROOT / "deploy" / "policies" / "cascade.yaml", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["version"].startswith("cascade-v1@")
    assert [(r["id"], r["action"].split()[0]) for r in got["rules"]] == [("block-clear", "block"),
                                                                       ("escalate-uncertain", "escalate")]
    assert got["rules"][1]["when"] == "score in [0.064, 0.531), where prompt"


@pytest.mark.parametrize("text, lines", [
    ("rules:\n  - {id: a, detector: harmful_intent, action: block, when: {threshold: 1.5}}\n"
     "  - {id: b, detector: harmful_intent, action: steer}\n",
     ["rules[0].when.threshold: must be in (0, 1)", "rules[1]: action 'steer' needs `steer`"]),
    ("rules:\n  - {id: a, detector: nope, action: log}\n", ["rules[0].detector: 'nope' is not loaded"]),
    ("rules:\n  - {id: a, detector: harmful_intent, action: steer, steer: {vector: no-such-vector}}\n",
     ["rules[0].steer.vector: no-such-vector: no such file or folder"]),
    ("rules:\n  - {id: a, detector: harmful_intent, action: escalate, escalate: {endpoint: m}}\n",
     ["rules[0].escalate.endpoint: 'm' is not under `escalations` (defined: none)"]),
    ("escalations:\n  m: {http: 'http://127.0.0.1:9/v1/moderations', api_key_env: LW_TEST_UNSET_KEY}\n"
     "rules:\n  - {id: a, detector: harmful_intent, action: escalate, escalate: {endpoint: m}}\n",
     ["escalations.m: api_key_env: environment variable LW_TEST_UNSET_KEY is not set or empty"]),
    ("rules:\n  - {id: a, detector: harmful_intent, action: log, when: {band: [0.5, 0.2]}}\n",
     ["rules[0].when.band: must be [low, high) with 0 <= low < high <= 1"]),
    ("rules: [oops", ["not valid YAML"]),
    ("- just a list\n", ["the file must hold a mapping with `rules` (a list)"]),
    ("rules: []\n", ["rules: List should have at least 1 item"]),
])
def test_a_bad_policy_names_every_problem_and_exits_2(tmp_path, no_model, monkeypatch, text, lines):
    monkeypatch.delenv("LW_TEST_UNSET_KEY", raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("policy", "check", path)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"error: policy {path} is invalid:")
    for line in lines:
        assert line in result.stderr, result.stderr


def test_a_missing_file_is_one_clear_error(tmp_path, no_model):
    result = run("policy", "check", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "nope.yaml is invalid:\n  file not found" in result.stderr


def test_serve_refuses_a_bad_policy_before_the_model_loads(tmp_path, no_model, fake_serve):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - {id: a, detector: harmful_intent, action: block, when: {threshold: 0}}\n")
    result = run("serve", "--policy", path, "--port", 0, "--metrics-port", 0, "--db", f"sqlite:///{tmp_path}/x.db")
    assert result.exit_code == 2 and "rules[0].when.threshold: must be in (0, 1)" in result.stderr
    assert fake_serve == []
