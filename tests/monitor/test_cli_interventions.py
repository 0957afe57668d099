"""`latentwatch interventions`: the decision trail from a database filled through StorageWriter (--db),
and from a running server over gRPC (--target), in both formats; and its one-line errors."""

from __future__ import annotations

import hashlib
import json
import socket
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from monitor import cli_serve
from monitor.config import Settings
from monitor.storage import InterventionRecord, RequestRecord, StorageWriter, open_database
from tests.monitor.cli_helpers import error_line, run
from tests.monitor.server_fixtures import RunningServer, runner

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
REQ = "0f3c9a7e2b114d5c9e8f7a6b5c4d3e2f"
SOC = "soc-secret-0123456789"


def _trail() -> list[InterventionRecord]:
    """One of each kind the trail holds, one second apart."""
    rule = dict(
        request_id=REQ, detector_id="harmful_intent", policy_version="p1", detector_version="1.2.0", client_id="app"
    )
    verdict = {
        "endpoint": "moderation",
        "flagged": True,
        "categories": ["violence"],
        "scores": {"violence": 0.9},
        "latency_s": 0.125,
        "error": None,
    }
    recs = [
        InterventionRecord(kind="log", token_start=3, rule_id="log-all", score=0.41, outcome="logged", **rule),
        InterventionRecord(
            kind="escalate", token_start=5, rule_id="cascade", score=0.62, outcome="blocked", escalation=verdict, **rule
        ),
        InterventionRecord(
            kind="escalate",
            token_start=6,
            rule_id="cascade",
            score=0.63,
            outcome="failed_open",
            escalation={**verdict, "flagged": False, "categories": [], "error": "timeout after 2 s"},
            **rule,
        ),
        InterventionRecord(
            kind="steer",
            token_start=7,
            rule_id="steer-refusal",
            score=0.81,
            outcome="steered",
            steering_kind="add",
            hook_point="blocks.14.resid_post",
            vector_id="refusal-smollm2",
            coefficient=4.0,
            details={"positions": "generated"},
            **rule,
        ),
        InterventionRecord(
            kind="shadow",
            token_start=7,
            rule_id="shadow-v2",
            score=0.91,
            outcome="shadowed",
            shadow_action="block",
            **{**rule, "detector_id": "harmful_intent_v2"},
        ),
        InterventionRecord(kind="block", token_start=9, rule_id="block-harmful", score=0.97, outcome="blocked", **rule),
        InterventionRecord(
            "req-other",
            "override",
            0,
            detector_id="always",
            details={"action": "block"},
            outcome="overridden",
            client_id="red-team",
        ),
        InterventionRecord(
            "req-other",
            "steer",
            0,
            steering_kind="clamp",
            hook_point="blocks.3.resid_post",
            coefficient=5.0,
            details={"sae_id": "sae-3", "latent": 1234, "positions": "all"},
            client_id="red-team",
        ),
    ]
    return [InterventionRecord(**{**r.__dict__, "created_at": T0 + timedelta(seconds=i)}) for i, r in enumerate(recs)]


@pytest.fixture(scope="module")
def trail(tmp_path_factory):
    """(database URL, the records written to it)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('trail')}/lw.db"
    recs = _trail()
    writer = StorageWriter(open_database(url)).start()
    writer.submit(RequestRecord(REQ, "generate", "tiny"))
    for rec in reversed(recs):  # the query orders them, not the writer
        writer.submit(rec)
    assert writer.close(timeout=30) and writer.write_failures == 0
    return url, recs


@pytest.fixture()
def narrow(monkeypatch):
    """Tables rendered for a 120-column terminal."""
    monkeypatch.setattr(cli_serve, "out", Console(width=120))


def test_a_table_by_default_readable_at_120_columns(trail, narrow):
    result = run("interventions", "--db", trail[0])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert lines[0].split() == ["time", "request", "kind", "rule", "detector", "score", "outcome", "token", "detail"]
    rows = [line.split() for line in lines if line.startswith("2025-")]  # a record's first line
    assert [r[3] for r in rows] == ["log", "escalate", "escalate", "steer", "shadow", "block", "override", "steer"]
    assert rows[0] == ["2025-06-01", "08:00:00", REQ[:8], "log", "log-all", "harmful_intent", "0.410", "logged", "3"]
    text = " ".join(result.stdout.split())  # a long detail folds onto the next line, alone there
    for cell in (
        "flagged violence 0.12s",
        "failed: timeout after 2 s",
        "refusal-smollm2 +4",
        "would block",
        "sae-3:1234=5",
        "overridden",
        "failed_open",
        "0.970",
        "block-harmful",
    ):
        assert cell in text, cell


def test_json_is_a_list_of_objects_with_every_field(trail):
    result = run("interventions", "--db", trail[0], "--format", "json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [g["intervention_id"] for g in got] == [r.intervention_id for r in trail[1]]
    escalated = got[1]
    assert {
        k: escalated[k]
        for k in (
            "kind",
            "rule_id",
            "policy_version",
            "detector_id",
            "detector_version",
            "score",
            "outcome",
            "token_index",
            "client_id",
            "create_time",
            "shadow_action",
        )
    } == {
        "kind": "escalate",
        "rule_id": "cascade",
        "policy_version": "p1",
        "detector_id": "harmful_intent",
        "detector_version": "1.2.0",
        "score": 0.62,
        "outcome": "blocked",
        "token_index": 5,
        "client_id": "app",
        "create_time": "2025-06-01T08:00:01+00:00",
        "shadow_action": None,
    }
    assert escalated["escalation"] == {
        "endpoint": "moderation",
        "flagged": True,
        "categories": ["violence"],
        "latency_seconds": 0.125,
        "error": "",
    }
    assert got[3]["steering"] == {
        "kind": "add",
        "hook_point": "blocks.14.resid_post",
        "coefficient": 4.0,
        "vector_id": "refusal-smollm2",
        "positions": "generated",
        "trigger_detector_id": "harmful_intent",
        "sae_id": "",
        "latent": 0,
    }
    assert got[4]["shadow_action"] == "block" and got[6]["override"] == {
        "detector_id": "always",
        "threshold": None,
        "action": "block",
    }


@pytest.mark.parametrize(
    "args, kept",
    [
        (["--kind", "escalate"], [1, 2]),
        (["--rule", "cascade"], [1, 2]),
        (["--detector", "harmful_intent_v2"], [4]),
        (["--client", "red-team"], [6, 7]),
        (["--request", "req-other", "--kind", "steer"], [7]),
        (["--since", "2025-06-01T08:00:02", "--until", "2025-06-01T08:00:04"], [2, 3]),  # no zone: UTC
        (["--since", "2025-06-01T10:00:05+02:00"], [5, 6, 7]),
        (["--limit", "2"], [0, 1]),
        (["--kind", "alert"], []),
    ],
)
def test_filters(trail, args, kept):
    result = run("interventions", "--db", trail[0], "--format", "json", *args)
    assert result.exit_code == 0, result.output
    assert [g["intervention_id"] for g in json.loads(result.stdout)] == [trail[1][i].intervention_id for i in kept]


def test_nothing_matching_says_so(trail):
    result = run("interventions", "--db", trail[0], "--rule", "no-such-rule")
    assert result.exit_code == 0 and "no interventions match" in result.stderr and not result.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--kind", "blocked"],
            "error: unknown --kind 'blocked': expected one of log, alert, block, steer, escalate, shadow, override",
        ),
        (["--format", "yaml"], "error: --format must be table or json, got 'yaml'"),
        (["--since", "2025-06-02", "--until", "2025-06-01"], "error: --until must be after --since"),
        (["--db", "sqlite:///does/not/exist.db"], "error: no database at does/not/exist.db"),
        (["--db", "sqlite:///x.db", "--target", "127.0.0.1:1"], "error: give --db (read the database) or --target"),
        (
            ["--target", "127.0.0.1:{port}", "--timeout", "5"],
            "error: cannot reach a latentwatch server at 127.0.0.1:{port}: UNAVAILABLE: ",
        ),
        (
            ["--db", "postgresql://lw:s3cret@127.0.0.1:{port}/lw"],
            "error: cannot open database 'postgresql+psycopg://lw:***@",
        ),
    ],
)
def test_errors_are_one_line(args, message):
    port = _closed_port()
    line = error_line(run("interventions", *(a.format(port=port) for a in args)))
    assert line.startswith(message.format(port=port)), line
    assert "s3cret" not in line


def test_a_running_server_answers_with_the_same_trail(trail, tmp_path):
    """--target pages GetInterventions (here 3 records a page) as the audit:* token from --token-file allows."""
    (tmp_path / "tokens.yaml").write_text(
        f"- {{sha256: {hashlib.sha256(SOC.encode()).hexdigest()}, client_id: soc, roles: ['audit:*']}}\n"
    )
    (tmp_path / "token").write_text(SOC + "\n")
    srv = RunningServer(
        Settings(
            packs=[], port=0, metrics_port=None, db=trail[0], auth_tokens=tmp_path / "tokens.yaml", max_page_size=3
        ),
        runner(),
    )
    try:
        remote = run("interventions", "--target", srv.target, "--token-file", tmp_path / "token", "--format", "json")
        without = run("interventions", "--target", srv.target, "--kind", "log")
        table = run(
            "interventions",
            "--target",
            srv.target,
            "--client",
            "red-team",
            "--limit",
            "1",
            env={"LATENTWATCH_TOKEN": SOC},
        )
    finally:
        srv.stop()
    local = run("interventions", "--db", trail[0], "--format", "json")
    assert remote.exit_code == 0, remote.output
    got, expected = json.loads(remote.stdout), json.loads(local.stdout)
    assert len(got) == len(trail[1])
    for g, e in zip(got, expected, strict=True):
        assert g == {**e, "score": pytest.approx(e["score"])}  # the wire's score is a float32
    assert error_line(without) == (f"error: {srv.target}: UNAUTHENTICATED: missing or invalid bearer token")
    assert table.exit_code == 0, table.output
    assert "override" in table.stdout and "steer" not in table.stdout and SOC not in table.output
