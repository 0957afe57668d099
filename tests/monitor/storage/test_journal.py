"""The alert journal: order, restarts, torn tails, the size bound, and replay into both databases."""

from __future__ import annotations

import dataclasses
import time
import zlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from monitor.storage import (
    AlertRecord,
    DetectorRecord,
    InterventionRecord,
    RequestRecord,
    StorageError,
    StorageFull,
    StorageWriter,
    check_journal_dir,
    get_alerts,
    get_request,
)
from monitor.storage.journal import Journal, JournalFull
from monitor.storage.models import Alert, Detector, Intervention, Request
from monitor.storage.records import from_json, to_json

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _alert(rid: str, i: int = 0, **kw) -> AlertRecord:
    fields = dict(created_at=T0 + timedelta(milliseconds=i), token_index=i, span_start=1, span_end=4,
                  span_text="abc", client_id="c1")
    return AlertRecord(rid, "deception", "1.0", 0.93, 0.8, **{**fields, **kw})


def _read_all(journal: Journal, chunk: int = 7) -> list:
    out = []
    while batch := journal.read(chunk):
        out += batch
    return out


def _segments(folder):
    return sorted(folder.glob("*.seg"))


def _count(engine, model) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def _wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------- the journal alone


def test_every_record_kind_comes_back_unchanged():
    steer = InterventionRecord("r1", "steer", 7, detector_id="deception", steering_kind="add",
                               hook_point="blocks.1.resid_post", vector_id="v", coefficient=-4.5,
                               details={"positions": "generated", "n": [1, 2]}, snapshot_version="s",
                               client_id="c", token_end=9, created_at=T0)
    why = {"tokens": [{"position": 7, "text": " b\u00e9", "score": 0.96875},
                      {"position": 2, "text": None, "score": 0.5}],
           "latents": [{"sae_id": "sae-15", "latent": 4095, "activation": 2.25}]}
    records = [
        RequestRecord("r1", "generate", "m", created_at=T0, finished_at=T0 + timedelta(seconds=2), client_id="c",
                      conversation_id="conv", tags={"env": "test", "n": 3}, finish_reason="stop", prompt_tokens=3,
                      completion_tokens=4, prompt_text="p\nq \u00e9\U0001f600", completion_text="c", alerted=True,
                      snapshot_version="s"),
        RequestRecord("r2", "score", "m", created_at=T0),
        _alert("r1", 3, input_index=2, conversation_id="conv", tags={"team": "red"}, snapshot_version="s",
               explanation=why),
        steer,
        InterventionRecord("r1", "override", 0, details={"threshold": 0.9}, created_at=T0),
        DetectorRecord("deception", "1.0", "linear", "blocks.1.resid_post", 0.8, calibration={"a": 1.5},
                       metrics={"auroc": 0.97}, loaded_at=T0),
    ]
    assert [from_json(*to_json(r)) for r in records] == records
    with pytest.raises(ValueError, match="unknown record type"):
        from_json("GoneRecord", {})
    with pytest.raises(ValueError, match="not a AlertRecord"):
        from_json("AlertRecord", {"request_id": "r", "renamed_field": 1})


def test_entries_come_back_in_order_across_segments_and_restarts(tmp_path):
    j = Journal(tmp_path, segment_bytes=2000).open()
    records = [_alert("r", i) for i in range(60)]
    assert [j.append(r) for r in records] == list(range(1, 61))
    assert len(_segments(tmp_path)) > 5
    got = _read_all(j)
    assert [e.seq for e in got] == list(range(1, 61)) and [e.record for e in got] == records
    assert j.read(7) == [] and j.depth == 60
    j.commit(got[:25])  # the database took the first 25
    assert j.depth == 35 and j.done_seq == 25
    assert int(_segments(tmp_path)[0].stem) > 1  # segments wholly committed are gone
    j.close()

    j = Journal(tmp_path, segment_bytes=2000).open()  # a restart
    assert j.replayed == j.depth == 35
    again = _read_all(j, chunk=100)
    assert [e.record for e in again] == records[25:]
    assert j.append(_alert("r", 60)) == 61  # numbering goes on
    assert [e.seq for e in j.read(10)] == [61]
    j.close()


def test_numbering_goes_on_when_everything_was_committed(tmp_path):
    j = Journal(tmp_path).open()
    for i in range(3):
        j.append(_alert("r", i))
    j.commit(_read_all(j))
    j.close()
    j = Journal(tmp_path).open()
    assert (j.replayed, j.depth, j.read(10)) == (0, 0, [])
    assert j.append(_alert("r", 3)) == 4  # not 1: that would read as committed already
    assert [e.seq for e in j.read(10)] == [4]
    j.close()


def _journal_of(tmp_path, n: int):
    """n alerts appended to a closed journal in tmp_path: (the records, its last segment file)."""
    j = Journal(tmp_path).open()
    records = [_alert("r", i) for i in range(n)]
    for r in records:
        j.append(r)
    j.close()
    return records, _segments(tmp_path)[-1]


def test_torn_tail_is_cut_off_and_nothing_acknowledged_is_lost(tmp_path):
    records, seg = _journal_of(tmp_path, 5)
    intact = seg.read_bytes()
    line = intact.splitlines(keepends=True)[0]
    with open(seg, "ab") as f:
        f.write(line[: len(line) // 2])  # the process died halfway through a sixth append

    j = Journal(tmp_path).open()
    assert seg.read_bytes() == intact and j.replayed == 5 and j.damaged == 0
    late = _alert("r", 5)
    assert j.append(late) == 6  # goes on at a line boundary
    assert [e.record for e in _read_all(j)] == [*records, late]
    j.close()
    j = Journal(tmp_path).open()
    assert (j.replayed, j.damaged) == (6, 0)
    j.close()


def test_a_damaged_line_is_skipped_and_the_others_kept(tmp_path):
    records, seg = _journal_of(tmp_path, 4)
    lines = seg.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"abc"', b'"abd"')  # a flipped bit: the checksum no longer matches
    seg.write_bytes(b"".join(lines))
    j = Journal(tmp_path).open()
    assert (j.replayed, j.damaged) == (3, 1)
    assert [e.record for e in _read_all(j)] == [records[0], *records[2:]]
    j.close()


def test_an_entry_that_cannot_be_read_back_is_kept_aside(tmp_path):
    j = Journal(tmp_path).open()
    j.append(_alert("r", 0))
    j.close()
    body = b'[2,1.0,"GoneRecord",{"x":1}]'  # e.g. written by another version
    with open(_segments(tmp_path)[-1], "ab") as f:
        f.write(b"%08x %s\n" % (zlib.crc32(body), body))
    j = Journal(tmp_path).open()
    assert j.replayed == 2
    assert [e.seq for e in _read_all(j)] == [1] and j.depth == 1
    kept = (tmp_path / "rejected.jsonl").read_text()
    assert "GoneRecord" in kept and "unknown record type" in kept
    j.close()


def test_full_journal_appends_nothing_until_there_is_room(tmp_path):
    j = Journal(tmp_path, max_bytes=4000, segment_bytes=1000).open()
    n = 0
    with pytest.raises(JournalFull, match="4000 bytes"):
        while True:
            j.append(_alert("r", n))
            n += 1
    size, depth = j.size_bytes, j.depth
    assert depth == n and 3000 < size <= 4000
    with pytest.raises(JournalFull):
        j.append(_alert("r", n))
    assert (j.size_bytes, j.depth) == (size, depth)
    assert sum(p.stat().st_size for p in _segments(tmp_path)) == size  # the bound is bytes on disk
    j.commit(_read_all(j))
    assert j.free_bytes >= j.segment_bytes and j.depth == 0
    assert j.append(_alert("r", n)) == n + 1
    j.close()


def test_one_server_per_journal_folder(tmp_path):
    j = Journal(tmp_path).open()
    with pytest.raises(StorageError, match="in use by another latentwatch server"):
        Journal(tmp_path).open()
    with pytest.raises(StorageError, match="in use"):
        check_journal_dir(tmp_path)
    j.close()
    check_journal_dir(tmp_path)
    Journal(tmp_path).open().close()


# ---------------------------------------------------------------------- the writer on both databases


def test_replaying_the_whole_journal_again_leaves_one_row_each(db_url, tmp_path):
    admitted = RequestRecord("r1", "generate", "m", created_at=T0, client_id="c1")
    alerts = [_alert("r1", i) for i in range(3)]
    steer = InterventionRecord("r1", "steer", 2, detector_id="deception", steering_kind="ablate",
                               hook_point="blocks.1.resid_post", vector_id="deception", coefficient=1.0,
                               created_at=T0)
    det = DetectorRecord("deception", "1.0", "linear", "blocks.1.resid_post", 0.8, loaded_at=T0)
    ended = dataclasses.replace(admitted, finished_at=T0 + timedelta(seconds=1), finish_reason="stop",
                                completion_tokens=5, alerted=True)
    w = StorageWriter(db_url, journal_dir=tmp_path, flush_interval_s=0.01).start()
    for rec in (admitted, *alerts, steer, det, ended, dataclasses.replace(steer, token_end=4)):
        assert w.submit(rec)
    assert w.close(timeout=30)
    (tmp_path / "done").unlink()  # as if the process died before it noted its progress

    w = StorageWriter(db_url, journal_dir=tmp_path).start()
    try:
        assert w.replayed == 8 and w.depth == 0  # all of it, in order, a second time
        assert [_count(w.engine, m) for m in (Request, Alert, Intervention, Detector)] == [1, 3, 1, 1]
        row = get_request(w.engine, "r1")
        assert (row.finished_at, row.completion_tokens) == (ended.finished_at, 5)  # the last version wins
        assert [a.alert_id for a in row.alerts] == [a.alert_id for a in alerts]
        assert row.interventions[0].token_end == 4
    finally:
        assert w.close(timeout=30)


def test_records_journaled_before_a_crash_are_written_at_the_next_start(db_url, tmp_path):
    w = StorageWriter(db_url, journal_dir=tmp_path)  # never started: nothing reached the database
    alerts = [_alert("r", i) for i in range(5)]
    for a in alerts:
        assert w.submit(a)
    assert w.close() is False  # they are still in the journal
    w = StorageWriter(db_url, journal_dir=tmp_path).start()
    try:
        assert w.replayed == 5
        rows, _ = get_alerts(w.engine)
        assert [r.alert_id for r in rows] == [a.alert_id for a in alerts]
    finally:
        assert w.close(timeout=30)


def _down_then_full(db_url, tmp_path, policy, **kw):
    """A writer whose alerts table is gone (writes fail) and whose journal is then filled."""
    w = StorageWriter(db_url, journal_dir=tmp_path, journal_max_bytes=8000, journal_full=policy,
                      retry_backoff_s=0.01, max_backoff_s=0.05, flush_interval_s=0.01, **kw).start()
    with w.engine.begin() as conn:
        conn.execute(text("DROP TABLE alerts"))
    kept = [_alert("r", 0)]
    assert w.submit(kept[0])
    _wait_until(lambda: w.write_failures >= 1)
    return w, kept


def test_full_journal_fail_closed_refuses_until_there_is_room(db_url, tmp_path):
    flips: list[bool] = []
    w, kept = _down_then_full(db_url, tmp_path, "fail_closed", on_accepting=flips.append)
    try:
        with pytest.raises(StorageFull, match=r"^alert journal full: the database has been unreachable for \d+ s; "
                                              r"retry on another replica$"):
            for i in range(1, 1000):
                a = _alert("r", i)
                w.submit(a)
                kept.append(a)
        assert not w.accepting and flips == [False] and w.dropped == 0
        assert w.journal_bytes <= 8000
        Alert.__table__.create(w.engine)  # the database is back
        _wait_until(lambda: w.accepting)
        assert flips == [False, True]
        assert w.submit(late := _alert("r", 5000))
        assert w.flush(timeout=30)
        rows, _ = get_alerts(w.engine, page_size=1000)
        assert sorted(r.alert_id for r in rows) == sorted(a.alert_id for a in [*kept, late])  # each once
    finally:
        assert w.close(timeout=30)


def test_full_journal_fail_open_serves_on_and_counts_drops(db_url, tmp_path):
    flips: list[bool] = []
    dropped: list = []
    w, kept = _down_then_full(db_url, tmp_path, "fail_open", on_accepting=flips.append, on_drop=dropped.append)
    try:
        results = []
        for i in range(1, 60):
            a = _alert("r", i)
            results.append(w.submit(a))
            if results[-1]:
                kept.append(a)
        assert False in results and results.index(False) > 5
        assert w.accepting and flips == []
        assert w.dropped == results.count(False) == len(dropped)
        Alert.__table__.create(w.engine)
        _wait_until(lambda: w.depth == 0)
        assert w.flush(timeout=30)
        rows, _ = get_alerts(w.engine, page_size=1000)
        assert sorted(r.alert_id for r in rows) == sorted(a.alert_id for a in kept)
    finally:
        assert w.close(timeout=30)


def test_a_record_postgresql_refuses_is_kept_aside_and_nul_is_no_way_out(pg_server, tmp_path):
    url = pg_server.create_database()
    rejected: list = []
    w = StorageWriter(url, journal_dir=tmp_path, on_reject=lambda rec, exc: rejected.append(rec)).start()
    try:
        nul = _alert("r", 0, span_text="a\x00b")  # PostgreSQL text holds no NUL
        bad = _alert("r", 1, input_index=2**40)  # beyond an INTEGER column
        good = _alert("r", 2)
        for rec in (nul, bad, good):
            assert w.submit(rec)
        assert w.flush(timeout=30)
        rows, _ = get_alerts(w.engine)
        assert [(r.alert_id, r.span_text) for r in rows] == [(nul.alert_id, "a\ufffdb"), (good.alert_id, "abc")]
        assert rejected == [bad] and w.records_failed == 1 and w.depth == 0
        assert bad.alert_id in (tmp_path / "rejected.jsonl").read_text()
    finally:
        assert w.close(timeout=30)
        pg_server.drop_database(make_url(url).database)


def test_only_what_a_client_may_hear_of_waits_for_its_own_sync(tmp_path, monkeypatch):
    """Admission rows ride along with the next sync, so admitting a request costs no fsync."""
    import monitor.storage.journal as journal_module
    from monitor.storage.writer import _told

    syncs = []
    real = journal_module._sync
    monkeypatch.setattr(journal_module, "_sync", lambda fd: syncs.append(fd) or real(fd))
    admitted = RequestRecord("r", "generate", "m")
    assert not _told(admitted) and _told(dataclasses.replace(admitted, finished_at=datetime.now(UTC)))
    assert _told(_alert("r"))
    j = Journal(tmp_path).open()
    j.append(admitted, sync=_told(admitted))
    assert syncs == []
    j.append(_alert("r"), sync=True)  # one sync makes both durable: same file, in order
    assert len(syncs) == 1
    j.append(admitted, sync=False)
    j.sync()
    j.sync()  # nothing new: no second sync
    assert len(syncs) == 2 and [e.seq for e in _read_all(j)] == [1, 2, 3]
    j.close()
