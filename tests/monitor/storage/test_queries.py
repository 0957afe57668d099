from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from monitor.storage import AlertRecord, AlertRow, StorageWriter, get_alerts

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


def _all_pages(engine, page_size, **filters) -> tuple[list[AlertRow], int]:
    rows: list[AlertRow] = []
    token, pages = None, 0
    while True:
        page, token = get_alerts(engine, page_size=page_size, page_token=token, **filters)
        pages += 1
        assert len(page) <= page_size
        rows.extend(page)
        if token is None:
            return rows, pages
        assert len(page) == page_size


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
    assert [(r.created_at, r.id) for r in rows] == sorted((r.created_at, r.id) for r in rows)
    assert [_ts(r.token_index) for r in rows] == [r.created_at for r in rows]
    for r in rows:
        rec = recs[r.token_index]
        assert (r.request_id, r.detector_id, r.client_id) == (
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
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) == N
    assert [r.token_index for r in rows] == _expected(engine, lambda r: True)
    assert pages == -(-N // page_size)  # no trailing empty page, even when N % size == 0
    keys = [(r.created_at, r.id) for r in rows]
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


def test_bad_page_token_is_a_clear_value_error(populated):
    engine, _ = populated
    wrong_version = base64.urlsafe_b64encode(json.dumps({"v": 99, "t": "x", "i": 1}).encode())
    for token in ["garbage!!", "e30", wrong_version.decode(), "bm90IGpzb24"]:
        with pytest.raises(ValueError, match="invalid page_token"):
            get_alerts(engine, page_token=token)
    for size in (0, -1, 1001):
        with pytest.raises(ValueError, match="page_size"):
            get_alerts(engine, page_size=size)


def test_empty_database(engine):
    assert get_alerts(engine) == ([], None)
