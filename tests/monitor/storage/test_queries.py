from __future__ import annotations

import base64
import dataclasses
import json
import socket
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from monitor.storage import (
    AlertRecord,
    AlertRow,
    InterventionRecord,
    StorageUnavailable,
    StorageWriter,
    create_storage_engine,
    get_alerts,
    get_interventions,
    get_request,
)
from monitor.storage.models import Alert

T0 = datetime(2025, 6, 1, 8, 0, 0, tzinfo=UTC)
N = 53


def _ts(i: int) -> datetime:
    return T0 + timedelta(seconds=i // 3)  # triples share a timestamp: ties on created_at


@pytest.fixture
def populated(engine):
    """N alerts in shuffled submit order; returns (engine, records by token_index)."""
    recs = {}
    w = StorageWriter(engine, batch_size=10, flush_interval_s=0.01).start()
    order = sorted(range(N), key=lambda i: (i * 7919) % N)  # not chronological
    for i in order:
        rec = AlertRecord(
            request_id=f"r{i % 5}",
            detector_id=f"d{i % 3}",
            detector_version="1",
            score=0.5 + i / 1000,
            threshold=0.5,
            action="alert",
            created_at=_ts(i),
            token_index=i,
            client_id=f"c{i % 2}",
        )
        recs[i] = rec
        w.submit(rec)
    assert w.close(timeout=30) and w.write_failures == 0
    return engine, recs


def _all_pages(engine, page_size, query=get_alerts, **filters) -> tuple[list, int]:
    rows: list = []
    token, pages = None, 0
    while True:
        page, token = query(engine, page_size=page_size, page_token=token, **filters)
        pages += 1
        assert len(page) <= page_size
        rows.extend(page)
        if token is None:
            return rows, pages
        assert len(page) == page_size


def _keys(engine, rows: list[AlertRow]) -> list[tuple[datetime, int]]:
    """The internal keyset order (created_at, integer key) of ``rows``."""
    with engine.connect() as conn:
        key = dict(conn.execute(select(Alert.alert_id, Alert.id)).all())
    return [(r.created_at, key[r.alert_id]) for r in rows]


def _expected(engine, pred) -> list[int]:
    """token_index of matching alerts in (created_at, id) order, from one unfiltered read."""
    everything, token = get_alerts(engine, page_size=1000)
    assert token is None
    return [r.token_index for r in everything if pred(r)]


def test_unfiltered_read_is_complete_and_ordered(populated):
    engine, recs = populated
    rows, token = get_alerts(engine, page_size=1000)
    assert token is None
    assert sorted(r.token_index for r in rows) == sorted(recs)
    assert _keys(engine, rows) == sorted(_keys(engine, rows))
    assert [_ts(r.token_index) for r in rows] == [r.created_at for r in rows]
    for r in rows:
        rec = recs[r.token_index]
        assert (r.alert_id, r.request_id, r.detector_id, r.client_id) == (
            rec.alert_id,  # the public id: what the server streamed is what GetAlerts returns
            rec.request_id,
            rec.detector_id,
            rec.client_id,
        )
        assert r.score == pytest.approx(rec.score)


def test_rows_are_plain_frozen_dataclasses(populated):
    engine, _ = populated
    rows, token = get_alerts(engine, page_size=5)
    assert len(rows) == 5 and token
    assert isinstance(rows[0], AlertRow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].score = 1.0  # type: ignore[misc]
    assert rows[0].created_at.tzinfo is not None


@pytest.mark.parametrize("page_size", [1, 7, 52, 53, 100])
def test_paging_has_no_duplicates_or_gaps(populated, page_size):
    engine, recs = populated
    rows, pages = _all_pages(engine, page_size)
    ids = [r.alert_id for r in rows]
    assert len(ids) == len(set(ids)) == N
    assert [r.token_index for r in rows] == _expected(engine, lambda r: True)
    assert pages == -(-N // page_size)  # no trailing empty page, even when N % size == 0
    keys = _keys(engine, rows)
    assert keys == sorted(keys)


def test_paging_with_filter_and_new_rows_arriving(populated):
    engine, recs = populated
    first, token = get_alerts(engine, detector_id="d1", page_size=4)
    # an alert arriving later (newer timestamp) shows up at the end, nothing is repeated
    late = AlertRecord("r9", "d1", "1", 0.9, 0.5, created_at=_ts(N) + timedelta(hours=1))
    w = StorageWriter(engine).start()
    w.submit(late)
    assert w.close(timeout=30)
    rest: list[AlertRow] = []
    while token:
        page, token = get_alerts(engine, detector_id="d1", page_size=4, page_token=token)
        rest.extend(page)
    rows = first + rest
    want = _expected(engine, lambda r: r.detector_id == "d1")  # read after the late insert
    assert want[-1] is None and len(want) == len({i for i in range(N) if i % 3 == 1}) + 1
    assert [r.token_index for r in rows] == want
    assert rows[-1].request_id == "r9"


def test_filters(populated):
    engine, recs = populated
    since, until = _ts(9), _ts(30)  # inclusive .. exclusive
    cases = [
        ({"detector_id": "d2"}, lambda r: r.detector_id == "d2"),
        ({"request_id": "r3"}, lambda r: r.request_id == "r3"),
        ({"client_id": "c1"}, lambda r: r.client_id == "c1"),
        ({"since": since}, lambda r: r.created_at >= since),
        ({"until": until}, lambda r: r.created_at < until),
        ({"since": since, "until": until}, lambda r: since <= r.created_at < until),
        (
            {"since": since, "until": until, "detector_id": "d0", "client_id": "c0"},
            lambda r: since <= r.created_at < until and r.detector_id == "d0" and r.client_id == "c0",
        ),
        ({"detector_id": "nope"}, lambda r: False),
    ]
    for filters, pred in cases:
        rows, _ = _all_pages(engine, 6, **filters)
        assert [r.token_index for r in rows] == _expected(engine, pred), filters


def test_time_filters_accept_other_time_zones_and_naive_utc(populated):
    engine, recs = populated
    cest = timezone(timedelta(hours=2))
    since_local = _ts(12).astimezone(cest)
    since_naive = _ts(12).replace(tzinfo=None)
    want = _expected(engine, lambda r: r.created_at >= _ts(12))
    assert 0 < len(want) < N
    for since in (since_local, since_naive):
        rows, _ = _all_pages(engine, 100, since=since)
        assert [r.token_index for r in rows] == want


def _token(**payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _payload(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def test_bad_page_token_is_a_short_value_error(populated):
    engine, _ = populated
    _, real = get_alerts(engine, page_size=5)
    scope = _payload(real)["f"]
    crafted = [
        "garbage!!",
        "e30",  # {}
        "bm90IGpzb24",  # not json
        _token(v=1, t=T0.isoformat(), i=1),  # the old format
        _token(v=2, f=scope, t=T0.isoformat(), i=2**70),  # past BIGINT
        _token(v=2, f=scope, t=T0.isoformat(), i=True),
        _token(v=2, f=scope, t=T0.isoformat(), i="1"),  # an intervention key on alerts
        _token(v=2, f=scope, t=T0.isoformat(), i=-1),
        _token(v=2, f=scope, t="2025-06-01T08:00:00", i=1),  # no time zone
        _token(v=2, f=scope, t="x" * 300, i=1),
        _token(v=2, f=scope, t=T0.isoformat(), i=1, pad="A" * 600),  # far too long
        "SELECT 1; DROP TABLE alerts" * 3,
    ]
    for token in crafted:
        with pytest.raises(ValueError, match="^page_token: invalid") as info:
            get_alerts(engine, page_token=token)
        msg = str(info.value)
        assert len(msg) < 160 and "SELECT alerts" not in msg, msg
        assert len(token) <= 32 or token[:33] not in msg  # echoed at most 32 characters
    for size in (0, -1, 1001):
        with pytest.raises(ValueError, match="page_size"):
            get_alerts(engine, page_size=size)


def test_page_token_is_bound_to_its_filters(populated):
    engine, _ = populated
    filters = {"detector_id": "d1", "client_id": "c0", "since": _ts(2), "until": _ts(40), "request_id": None}
    _, token = get_alerts(engine, page_size=2, **filters)
    assert token
    # the same filters, spelled differently (another time zone): still the same query
    cest = timezone(timedelta(hours=2))
    same = {**filters, "since": _ts(2).astimezone(cest)}
    assert get_alerts(engine, page_size=2, page_token=token, **same)[0]
    for name, other in [
        ("detector_id", "d2"),
        ("client_id", None),
        ("since", _ts(3)),
        ("until", None),
        ("request_id", "r1"),
    ]:
        with pytest.raises(ValueError, match="^page_token: was issued for other filters; start again without it$"):
            get_alerts(engine, page_size=2, page_token=token, **{**filters, name: other})


EARLY = [
    datetime(1, 1, 1),
    datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),  # before year 1 in UTC
    datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=-1))),
]
LATE = [
    datetime.max,
    datetime.max.replace(tzinfo=UTC),
    datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),  # after 9999 in UTC
]


def test_time_bounds_out_of_range_clamp(populated):
    engine, _ = populated
    for bound in EARLY:
        assert len(get_alerts(engine, since=bound, page_size=1000)[0]) == N, bound
        assert get_alerts(engine, until=bound) == ([], None), bound
    for bound in LATE:
        assert get_alerts(engine, since=bound) == ([], None), bound
        assert len(get_alerts(engine, until=bound, page_size=1000)[0]) == N, bound


def test_crafted_token_times_clamp_instead_of_failing(populated):
    engine, _ = populated
    _, real = get_alerts(engine, page_size=5)
    p = _payload(real)
    early = _token(**{**p, "t": "0001-01-01T00:00:00+01:00", "i": 0})
    late = _token(**{**p, "t": "9999-12-31T23:00:00-05:00"})
    assert len(get_alerts(engine, page_size=1000, page_token=early)[0]) == N
    assert get_alerts(engine, page_token=late) == ([], None)


def test_unusable_filter_text_is_a_value_error(populated):
    engine, _ = populated
    for filters in ({"detector_id": "a\x00b"}, {"client_id": "\ud800"}, {"request_id": 5}):
        with pytest.raises(ValueError, match=next(iter(filters))):
            get_alerts(engine, **filters)
    with pytest.raises(ValueError, match="since"):
        get_alerts(engine, since="2025-01-01")


def test_empty_database(engine):
    assert get_alerts(engine) == ([], None)


@pytest.fixture
def trail(engine):
    """N block interventions in shuffled submit order, triples sharing a timestamp."""
    w = StorageWriter(engine, batch_size=10, flush_interval_s=0.01).start()
    for i in sorted(range(N), key=lambda i: (i * 7919) % N):
        rec = InterventionRecord(
            f"r{i % 5}", "block", i, detector_id=f"d{i % 3}", client_id=f"c{i % 2}", created_at=_ts(i)
        )
        w.submit(rec)
    assert w.close(timeout=30) and w.write_failures == 0
    return engine


def test_interventions_page_like_alerts(trail):
    engine = trail
    everything, token = get_interventions(engine, page_size=1000)
    assert token is None and len(everything) == N
    keys = [(r.created_at, r.intervention_id) for r in everything]
    assert keys == sorted(keys)
    since, until = _ts(9), _ts(30)
    for filters, pred in [
        ({}, lambda r: True),
        ({"request_id": "r3"}, lambda r: r.request_id == "r3"),
        ({"client_id": "c1", "since": since}, lambda r: r.client_id == "c1" and r.created_at >= since),
        ({"since": since, "until": until}, lambda r: since <= r.created_at < until),
    ]:
        for size in (1, 4, 53):
            rows, _ = _all_pages(engine, size, get_interventions, **filters)
            assert rows == [r for r in everything if pred(r)], (filters, size)


def test_interventions_tokens_are_checked_like_alerts(trail, populated):
    engine = trail
    _, token = get_interventions(engine, page_size=2, request_id="r1")
    with pytest.raises(ValueError, match="issued for other filters"):
        get_interventions(engine, page_size=2, request_id="r2", page_token=token)
    _, alerts_token = get_alerts(engine, page_size=2)
    with pytest.raises(ValueError, match="^page_token: invalid"):  # an alert's key is an integer
        get_interventions(engine, page_token=alerts_token)
    p = _payload(token)
    with pytest.raises(ValueError, match="^page_token: invalid"):
        get_interventions(engine, request_id="r1", page_token=_token(**{**p, "i": "a\x00b"}))
    rows, _ = get_interventions(engine, until=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
    assert rows == []


POLICY_KINDS = ("log", "alert", "escalate", "shadow", "block", "steer")


@pytest.fixture
def policy_trail(engine):
    """N records of the kinds policy rules write, with their rule ids, in shuffled submit order."""
    w = StorageWriter(engine, batch_size=10, flush_interval_s=0.01).start()
    for i in sorted(range(N), key=lambda i: (i * 7919) % N):
        kind = POLICY_KINDS[i % len(POLICY_KINDS)]
        extra = {
            "escalate": {"escalation": {"endpoint": "mod", "flagged": True, "latency_s": 0.1}},
            "shadow": {"shadow_action": "block"},
            "steer": {"steering_kind": "add", "hook_point": "blocks.1.resid_post", "vector_id": "v", "coefficient": 2},
        }.get(kind, {})
        rec = InterventionRecord(
            f"r{i % 5}",
            kind,
            i,
            detector_id=f"d{i % 4}",
            rule_id=f"rule-{i % 3}",
            policy_version="p1",
            score=i / N,
            outcome="logged",
            created_at=_ts(i),
            **extra,
        )
        w.submit(rec)
    assert w.close(timeout=30) and w.write_failures == 0
    return engine


def test_interventions_filter_by_detector_rule_and_kind(policy_trail):
    engine = policy_trail
    everything, _ = get_interventions(engine, page_size=1000)
    assert len(everything) == N and {r.kind for r in everything} == set(POLICY_KINDS)
    for filters, pred in [
        ({"detector_id": "d2"}, lambda r: r.detector_id == "d2"),
        ({"rule_id": "rule-1"}, lambda r: r.rule_id == "rule-1"),
        ({"kind": "escalate"}, lambda r: r.kind == "escalate"),
        ({"kind": "override"}, lambda r: False),
        ({"rule_id": "rule-0", "kind": "log"}, lambda r: r.rule_id == "rule-0" and r.kind == "log"),
        (
            {"detector_id": "d1", "rule_id": "rule-2", "request_id": "r0"},
            lambda r: (r.detector_id, r.rule_id, r.request_id) == ("d1", "rule-2", "r0"),
        ),
        ({"kind": "steer", "since": _ts(6)}, lambda r: r.kind == "steer" and r.created_at >= _ts(6)),
    ]:
        expected = [r for r in everything if pred(r)]
        for size in (1, 3, 53):
            rows, _ = _all_pages(engine, size, get_interventions, **filters)
            assert rows == expected, (filters, size)
    shadow = get_interventions(engine, kind="shadow")[0]
    escalated = get_interventions(engine, kind="escalate")[0]
    assert {r.shadow_action for r in shadow} == {"block"} and all(r.escalation["endpoint"] == "mod" for r in escalated)


def test_interventions_tokens_are_bound_to_rule_kind_and_detector(policy_trail):
    engine = policy_trail
    for filters, other in [
        ({"kind": "log"}, {"kind": "alert"}),
        ({"rule_id": "rule-0"}, {"rule_id": "rule-1"}),
        ({"detector_id": "d0"}, {"detector_id": "d1"}),
        ({"kind": "log"}, {}),
    ]:
        _, token = get_interventions(engine, page_size=1, **filters)
        assert token is not None
        assert get_interventions(engine, page_size=1, page_token=token, **filters)[0]
        with pytest.raises(ValueError, match="issued for other filters"):
            get_interventions(engine, page_size=1, page_token=token, **other)
    for name in ("rule_id", "kind", "detector_id"):
        with pytest.raises(ValueError, match=f"^{name}: must be text without NUL"):
            get_interventions(engine, **{name: "a\x00b"})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once closed


@pytest.mark.parametrize(
    "query",
    [get_alerts, get_interventions, lambda engine: get_request(engine, "r1")],
    ids=["get_alerts", "get_interventions", "get_request"],
)
def test_database_down_is_storage_unavailable(query, tmp_path):
    port = _closed_port()
    down = [
        create_storage_engine(f"postgresql://watcher:s3cret@127.0.0.1:{port}/latentwatch"),
        create_storage_engine(f"sqlite:///{tmp_path}"),  # a folder: SQLite cannot open it
    ]
    for engine in down:
        with pytest.raises(StorageUnavailable) as info:
            query(engine)
        assert str(info.value) == "database unavailable; retry later"
        assert info.value.__cause__ is not None  # the details stay for the server's log
        engine.dispose()
