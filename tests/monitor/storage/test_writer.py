from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from monitor.storage import (
    AlertRecord,
    DetectorRecord,
    InterventionRecord,
    RequestRecord,
    StorageError,
    StorageWriter,
    create_storage_engine,
    get_alerts,
    get_request,
    open_database,
    text_sha256,
)
from monitor.storage.models import Alert, Detector, Intervention, Request

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _request(rid: str, *, alerted: bool = False, **kw) -> RequestRecord:
    fields = {
        "request_id": rid,
        "kind": "generate",
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "created_at": T0,
        "finished_at": T0 + timedelta(seconds=2),
        "client_id": "client-a",
        "conversation_id": "conv-1",
        "tags": {"env": "test", "n": 3},
        "finish_reason": "stop",
        "prompt_tokens": 11,
        "completion_tokens": 22,
        "prompt_text": "How do I bake bread?",
        "completion_text": "Mix flour, water, yeast.",
        "alerted": alerted,
    }
    fields.update(kw)
    return RequestRecord(**fields)


WHY = {"tokens": [{"position": 5, "text": " flour", "score": 0.875}, {"position": 9, "text": "yeast", "score": 0.5}],
       "latents": [{"sae_id": "sae-1", "latent": 3, "activation": 1.5}]}


def _alert(rid: str, i: int = 0, **kw) -> AlertRecord:
    fields = {
        "request_id": rid,
        "detector_id": "deception",
        "detector_version": "1.0",
        "score": 0.93,
        "threshold": 0.8,
        "action": "steer",
        "created_at": T0 + timedelta(milliseconds=i),
        "token_index": i,
        "span_start": 5,
        "span_end": 10,
        "span_text": "flour",
        "client_id": "client-a",
    }
    fields.update(kw)
    return AlertRecord(**fields)


def _count(engine, model) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def _writer(db_url, **kw) -> StorageWriter:
    kw.setdefault("flush_interval_s", 0.05)
    return StorageWriter(db_url, **kw).start()


def test_round_trip_all_record_kinds(db_url):
    w = _writer(db_url, text_policy="always")
    try:
        steer = InterventionRecord(
            request_id="r1",
            kind="steer",
            token_start=7,
            detector_id="deception",
            steering_kind="add",
            hook_point="blocks.12.resid_post",
            vector_id="honesty-v2",
            coefficient=-4.5,
            details={"positions": "generated"},
            snapshot_version="snap-3",
            client_id="client-a",
            created_at=T0 + timedelta(seconds=1),
        )
        override = InterventionRecord(
            request_id="r1",
            kind="override",
            token_start=0,
            details={"detector_id": "deception", "threshold": 0.9, "action": "alert"},
            created_at=T0,
        )
        block = InterventionRecord("r1", "block", 9, detector_id="deception", created_at=T0 + timedelta(seconds=2))
        det = DetectorRecord(
            detector_id="deception",
            version="1.0",
            kind="linear_probe",
            hook_point="model.layers.12.resid_post",
            threshold=0.8,
            calibration={"method": "platt", "a": 1.5, "b": -0.2},
            metrics={"auroc": 0.97, "fpr_at_tpr": [0.01, 0.9]},
            loaded_at=T0,
        )
        alert = _alert("r1", snapshot_version="snap-3", conversation_id="conv-1", tags={"team": "red"})
        request = _request("r1", alerted=True, snapshot_version="snap-3")
        for rec in (request, alert, steer, override, block, det):
            assert w.submit(rec) is True
        assert w.flush(timeout=30)
        # the steering ends later: same id, token_end now known
        assert w.submit(dataclasses.replace(steer, token_end=19))
        assert w.flush(timeout=30)
        assert w.write_failures == 0 and w.dropped == 0 and w.written == 7

        row = get_request(w.engine, "r1")
        assert row is not None
        assert row.kind == "generate" and row.model_id.endswith("SmolLM2-135M-Instruct")
        assert row.created_at == T0 and row.created_at.tzinfo is not None
        assert row.finished_at == T0 + timedelta(seconds=2)
        assert (row.client_id, row.conversation_id) == ("client-a", "conv-1")
        assert row.tags == {"env": "test", "n": 3}
        assert (row.finish_reason, row.prompt_tokens, row.completion_tokens) == ("stop", 11, 22)
        assert row.prompt_text == "How do I bake bread?"
        assert row.completion_text == "Mix flour, water, yeast."
        assert row.alerted is True and row.snapshot_version == "snap-3"

        (a,) = row.alerts
        assert a.alert_id == alert.alert_id and len(a.alert_id) == 32
        assert (a.detector_id, a.detector_version) == ("deception", "1.0")
        assert a.score == pytest.approx(0.93) and a.threshold == pytest.approx(0.8)
        assert (a.token_index, a.span_start, a.span_end) == (0, 5, 10)
        assert (a.span_text, a.action, a.client_id) == ("flour", "steer", "client-a")
        assert a.created_at == T0
        assert (a.snapshot_version, a.request_kind, a.input_index) == ("snap-3", "generate", None)
        assert (a.conversation_id, a.tags) == ("conv-1", {"team": "red"})

        ov, st, bl = row.interventions  # oldest first
        assert ov.intervention_id == override.intervention_id
        assert (ov.kind, ov.detector_id, ov.trigger) == ("override", None, "request")
        assert ov.details == {"detector_id": "deception", "threshold": 0.9, "action": "alert"}
        assert (ov.steering_kind, ov.hook_point, ov.vector_id, ov.coefficient) == (None, None, None, None)
        assert st.intervention_id == steer.intervention_id
        assert (st.kind, st.steering_kind, st.hook_point, st.vector_id) == (
            "steer",
            "add",
            "blocks.12.resid_post",
            "honesty-v2",
        )
        assert st.coefficient == pytest.approx(-4.5) and st.details == {"positions": "generated"}
        assert (st.detector_id, st.trigger, st.token_start, st.token_end) == ("deception", "deception", 7, 19)
        assert (st.snapshot_version, st.client_id) == ("snap-3", "client-a")
        assert (bl.kind, bl.detector_id, bl.trigger, bl.token_start, bl.details) == (
            "block",
            "deception",
            "deception",
            9,
            {},
        )
        assert _count(w.engine, Intervention) == 3

        with w.engine.connect() as conn:
            d = conn.execute(select(Detector)).one()
        assert (d.id, d.version, d.kind, d.threshold) == ("deception", "1.0", "linear_probe", 0.8)
        assert d.calibration == {"method": "platt", "a": 1.5, "b": -0.2}
        assert d.metrics == {"auroc": 0.97, "fpr_at_tpr": [0.01, 0.9]}
        assert d.loaded_at == T0

        assert get_request(w.engine, "nope") is None
    finally:
        assert w.close(timeout=30)


def _admission(rid: str) -> RequestRecord:
    """What the service submits when it admits a request: no end, no text, not alerted yet."""
    return _request(
        rid, finished_at=None, finish_reason=None, completion_tokens=0, prompt_text=None, completion_text=None
    )


@pytest.mark.parametrize("one_batch", [False, True])
def test_admission_row_is_replaced_by_the_end_record_and_alerts_never_orphan(db_url, one_batch):
    w = _writer(db_url, text_policy="alerts_only", flush_interval_s=30 if one_batch else 0.05)
    try:
        admitted = _admission("r1")
        assert w.submit(admitted)
        if not one_batch:
            assert w.flush(timeout=30)
            row = get_request(w.engine, "r1")
            assert row.finished_at is None and row.alerts == ()
        alert = _alert("r1")
        assert w.submit(alert)
        if not one_batch:
            assert w.flush(timeout=30)
            row = get_request(w.engine, "r1")  # mid-request: the alert already has its request
            assert row.finished_at is None and [a.alert_id for a in row.alerts] == [alert.alert_id]
        end = _request("r1", alerted=True, created_at=admitted.created_at)
        assert w.submit(end)
        assert w.flush(timeout=30) and w.write_failures == 0
        row = get_request(w.engine, "r1")
        assert _count(w.engine, Request) == 1
        assert (row.finished_at, row.finish_reason, row.completion_tokens) == (end.finished_at, "stop", 22)
        assert row.completion_text == end.completion_text  # alerted at the end: alerts_only keeps it
        assert [a.alert_id for a in row.alerts] == [alert.alert_id]
        with w.engine.connect() as conn:
            orphans = conn.execute(
                select(func.count()).select_from(Alert).where(Alert.request_id.not_in(select(Request.request_id)))
            ).scalar_one()
        assert orphans == 0
    finally:
        assert w.close(timeout=30)


def test_resubmitted_alert_replaces_its_row(db_url):
    w = _writer(db_url)
    try:
        alert = _alert("r1")
        w.submit(alert)
        w.submit(dataclasses.replace(alert, score=0.95))  # same batch
        assert w.flush(timeout=30)
        w.submit(dataclasses.replace(alert, score=0.97))  # a later batch, as in a retried write
        assert w.flush(timeout=30) and w.write_failures == 0
        rows, _ = get_alerts(w.engine)
        assert [(r.alert_id, r.score) for r in rows] == [(alert.alert_id, pytest.approx(0.97))]
    finally:
        assert w.close(timeout=30)


def test_resubmitted_request_and_detector_replace_rows(db_url):
    w = _writer(db_url)
    try:
        # same batch and separate batches
        w.submit(_request("r1", finished_at=None, finish_reason=None))
        w.submit(_request("r1", completion_tokens=99))
        w.flush(timeout=30)
        w.submit(_request("r1", completion_tokens=100, finish_reason="length"))
        det = DetectorRecord("d", "1", "sae", "h", 0.5, loaded_at=T0)
        w.submit(det)
        w.flush(timeout=30)
        w.submit(dataclasses.replace(det, threshold=0.7, loaded_at=T0 + timedelta(hours=1)))
        w.submit(DetectorRecord("d", "2", "sae", "h", 0.6, loaded_at=T0))
        assert w.flush(timeout=30)
        assert w.write_failures == 0
        row = get_request(w.engine, "r1")
        assert (row.completion_tokens, row.finish_reason) == (100, "length")
        assert _count(w.engine, Request) == 1
        with w.engine.connect() as conn:
            dets = conn.execute(select(Detector).order_by(Detector.version)).all()
        assert [(x.version, x.threshold) for x in dets] == [("1", 0.7), ("2", 0.6)]
        assert dets[0].loaded_at == T0 + timedelta(hours=1)
    finally:
        w.close(timeout=30)


@pytest.mark.parametrize(
    "policy, alerted, keeps_text",
    [
        ("always", False, True),
        ("always", True, True),
        ("alerts_only", True, True),
        ("alerts_only", False, False),
        ("never", True, False),
        ("never", False, False),
    ],
)
def test_text_policy(db_url, policy, alerted, keeps_text):
    w = _writer(db_url, text_policy=policy)
    try:
        rec = _request("r1", alerted=alerted)
        w.submit(rec)
        if alerted:
            w.submit(_alert("r1", explanation=WHY))
        assert w.flush(timeout=30)
        row = get_request(w.engine, "r1")
    finally:
        w.close(timeout=30)
    expected_hash = hashlib.sha256(rec.prompt_text.encode() + b"\x00" + rec.completion_text.encode()).hexdigest()
    assert row.text_sha256 == expected_hash == text_sha256(rec.prompt_text, rec.completion_text)
    if keeps_text:
        assert (row.prompt_text, row.completion_text) == (rec.prompt_text, rec.completion_text)
    else:
        assert row.prompt_text is None and row.completion_text is None
    if alerted:
        # "never" keeps no text anywhere: the alert's span text goes too, offsets stay
        (alert,) = row.alerts
        assert alert.span_text == (None if policy == "never" else "flour")
        assert (alert.span_start, alert.span_end) == (5, 10)
        # and its explanation's token texts (prompt or completion text): positions and scores stay
        texts = [None, None] if policy == "never" else [" flour", "yeast"]
        assert alert.explanation == {**WHY, "tokens": [{**t, "text": x} for t, x in zip(WHY["tokens"], texts)]}


def test_clean_close_loses_nothing(db_url):
    n_requests, alerts_per_request = 500, 9  # 5,000 records
    w = StorageWriter(db_url).start()
    for r in range(n_requests):
        rid = f"req-{r:04d}"
        for i in range(alerts_per_request):
            assert w.submit(_alert(rid, i))
        assert w.submit(_request(rid, alerted=True))
    assert w.close(timeout=120)
    assert (w.dropped, w.write_failures, w.written) == (0, 0, 5000)
    assert w.depth == 0 and not w.running
    engine = open_database(db_url)
    try:
        assert _count(engine, Request) == n_requests
        assert _count(engine, Alert) == n_requests * alerts_per_request
    finally:
        engine.dispose()
    assert w.submit(_alert("late")) is False  # after close: dropped, counted
    assert w.dropped == 1


def test_concurrent_submit_from_many_threads(db_url):
    n_threads, per_thread = 8, 400
    w = _writer(db_url, batch_size=64)
    barrier = threading.Barrier(n_threads)
    results: list[bool] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        barrier.wait()
        ok = [w.submit(_alert(f"t{t}", i, client_id=f"c{t}")) for i in range(per_thread)]
        ok.append(w.submit(_request(f"t{t}", client_id=f"c{t}", alerted=True)))
        with lock:
            results.extend(ok)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(results) and len(results) == n_threads * (per_thread + 1)
    assert w.flush(timeout=60)
    try:
        with w.engine.connect() as conn:
            pairs = conn.execute(select(Alert.request_id, Alert.token_index)).all()
        assert len(pairs) == n_threads * per_thread
        assert set(pairs) == {(f"t{t}", i) for t in range(n_threads) for i in range(per_thread)}
        assert _count(w.engine, Request) == n_threads
        assert w.write_failures == 0
    finally:
        assert w.close(timeout=60)


def _wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_missing_table_is_retried_until_it_is_back(db_url):
    failures: list[tuple[BaseException, int]] = []
    w = _writer(db_url, retry_backoff_s=0.01, max_backoff_s=0.05, on_failure=lambda e, n: failures.append((e, n)))
    try:
        w.submit(_alert("r0"))
        assert w.flush(timeout=30) and w.written == 1
        with w.engine.begin() as conn:
            conn.execute(text("DROP TABLE alerts"))
        for i in range(3):
            w.submit(_alert("r1", i))
        _wait_until(lambda: len(failures) >= 3)
        assert w.flush(timeout=30) is False  # at once: writes are failing
        assert w.depth == 3 and w.records_failed == 0 and w.outage_s > 0 and w.running
        assert w.oldest_pending_s > 0
        Alert.__table__.create(w.engine)  # the operator puts it back
        _wait_until(lambda: w.depth == 0)
        assert w.flush(timeout=30) and w.outage_s == 0
        rows, _ = get_alerts(w.engine)
        assert sorted(r.token_index for r in rows) == [0, 1, 2]  # none lost, none twice
        assert w.write_failures == len(failures) >= 3 and w.dropped == 0
    finally:
        assert w.close(timeout=30)


def test_unreachable_database_keeps_records_for_the_next_start(db_url, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = create_storage_engine(f"postgresql://u:pw@127.0.0.1:{port}/gone")
    seen = []
    w = StorageWriter(engine, journal_dir=tmp_path / "journal", retry_backoff_s=0.01, max_backoff_s=0.05,
                      flush_interval_s=0.01, on_failure=lambda e, n: seen.append(n)).start()
    for i in range(10):
        assert w.submit(_alert("r", i))
    _wait_until(lambda: w.write_failures >= 3)
    assert w.depth == 10 and w.records_failed == 0 and w.running and w.accepting
    t0 = time.monotonic()
    assert w.close(timeout=30) is False  # gives up at once while the database is down
    assert time.monotonic() - t0 < 10
    engine.dispose()

    w = StorageWriter(db_url, journal_dir=tmp_path / "journal").start()  # the next start, on a database
    try:
        assert w.replayed == 10 and w.depth == 0
        rows, _ = get_alerts(w.engine)
        assert sorted(r.token_index for r in rows) == list(range(10))
    finally:
        assert w.close(timeout=30)


def test_flush_waits_for_batches_in_flight(db_url):
    # a long flush interval: flush() must not wait for it, and must see every record
    w = _writer(db_url, flush_interval_s=30, batch_size=1000)
    try:
        for i in range(10):
            w.submit(_alert("r", i))
        assert w.flush(timeout=10)
        assert _count(w.engine, Alert) == 10
        rows, _ = get_alerts(w.engine, request_id="r")
        assert [r.token_index for r in rows] == list(range(10))
    finally:
        assert w.close(timeout=10)


def test_records_validate_in_the_caller():
    with pytest.raises(ValueError, match="kind"):
        _request("r", kind="chat")
    with pytest.raises(ValueError, match="action"):
        _alert("r", action="panic")
    with pytest.raises(ValueError, match="timezone"):
        _alert("r", created_at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="text_policy"):
        StorageWriter("sqlite://", text_policy="sometimes")


def test_start_fails_loudly_when_database_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = StorageWriter(f"postgresql://u:topsecret@127.0.0.1:{port}/gone")
    with pytest.raises(StorageError) as info:
        w.start()
    assert "topsecret" not in str(info.value) and f"127.0.0.1:{port}/gone" in str(info.value)
    assert not w.running
    assert w.close()  # nothing was submitted: nothing left
