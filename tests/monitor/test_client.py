"""monitor.client against a real in-process server on loopback: typed results, snapshot versions,
override and steering interventions, and every enum crossing through monitor.mapping's tables."""

from __future__ import annotations

import asyncio
import importlib.metadata

import grpc
import numpy as np
import pytest

from latentwatch.v1 import monitor_pb2 as pb
from monitor import client as lw
from monitor import enums as mapping
from monitor.client import (
    Alert,
    AsyncClient,
    Client,
    Detector,
    DetectorList,
    Intervention,
    OverrideInfo,
    ScoreResults,
    ServerInfo,
    SteeringInfo,
    Summary,
    Token,
)
from monitor.config import Settings
from monitor.domain import (
    ACTIONS,
    FINISH_REASONS,
    INTERVENTION_KINDS,
    REQUEST_KINDS,
    STEERING_KINDS,
    STEERING_POSITIONS,
)
from probes.fingerprint import fingerprint
from probes.kinds.mlp import MlpConfig, MlpProbe
from probes.pack import Aggregation, Manifest, ProbePack
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

TRUSTED = {"policy_overrides": True, "weaken_monitoring": True, "steering": True, "steer_detector_directions": True}


def make_mlp_pack(r, folder, *, id="mlp", threshold=1.0, seed=2):
    """Like `make_pack`, with a small MLP probe (DETECTOR_KIND_MLP_PROBE on the wire)."""
    rng = np.random.default_rng(seed)
    d = r.d_model
    y = rng.integers(0, 2, 200)
    x = (rng.normal(size=(200, d)) + np.outer(y, np.ones(d))).astype(np.float32)
    cfg = MlpConfig(hidden=8, epochs=2)
    probe = MlpProbe(cfg)
    probe.fit(x, y)
    manifest = Manifest(
        schema_version=1, id=id, version="0.0.1", kind="mlp", kind_config=cfg.model_dump(),
        hook_point="blocks.1.resid_post", d_model=d, aggregation=Aggregation(kind="max"), input_format="chat",
        threshold=threshold, metrics={"test": {"auroc": 0.5}}, model=fingerprint(r.model, r.tokenizer),
        provenance={"seed": seed}, description=f"toy mlp detector {id}",
    )
    ProbePack(manifest, probe).save(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    r = runner()
    packs = [make_pack(r, tmp / "always", id="always", threshold=0.0),
             make_pack(r, tmp / "never", id="never", threshold=1.0, seed=1),
             make_mlp_pack(r, tmp / "mlp", id="mlp")]
    settings = Settings(packs=packs, port=0, metrics_port=None, db=f"sqlite:///{tmp}/db.sqlite",
                        permissions={"trusted": TRUSTED}, detectors={"never": {"action": "block"}})
    srv = RunningServer(settings, r)
    yield srv, r
    srv.stop()


@pytest.fixture(scope="module")
def client(setup):
    with Client(setup[0].target, timeout=60) as c:
        yield c


def split(events):
    kinds = {Token: [], Alert: [], Intervention: [], Summary: []}
    for e in events:
        kinds[type(e)].append(e)
    return kinds


# ----------------------------------------------------------------------- server info, versions


def test_get_server_info(setup, client):
    r = setup[1]
    info = client.get_server_info()
    assert isinstance(info, ServerInfo)
    assert info.model_id == r.model_id and len(info.model_fingerprint) == 64
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.server_version == importlib.metadata.version("latentwatch")
    assert info.snapshot_version
    assert all(isinstance(d, Detector) for d in info.detectors)
    assert {d.id: d.kind for d in info.detectors} == {"always": "linear_probe", "never": "linear_probe",
                                                      "mlp": "mlp_probe"}


def test_list_detectors_carries_kind_action_and_snapshot_version(client):
    dets = client.list_detectors()
    assert isinstance(dets, DetectorList) and isinstance(dets, list)
    assert dets.snapshot_version == client.get_server_info().snapshot_version
    by_id = {d.id: d for d in dets}
    assert by_id["always"].action == "alert" and by_id["never"].action == "block"
    assert by_id["mlp"].kind == "mlp_probe" and by_id["always"].kind == "linear_probe"
    assert by_id["always"].hook_point == "blocks.1.resid_post" and by_id["always"].metrics == {"auroc": 0.5}
    assert by_id["always"].description == "toy detector always"


def test_reload_with_same_config_keeps_the_snapshot_version(client):
    before = client.list_detectors().snapshot_version
    after = client.reload_detectors()
    assert isinstance(after, DetectorList) and {d.id for d in after} == {"always", "never", "mlp"}
    assert after.snapshot_version == before == client.get_server_info().snapshot_version


def test_score_results_carry_request_id_snapshot_version_and_stored_alerts_map_back(client):
    version = client.get_server_info().snapshot_version
    res = client.score(["first", [{"role": "user", "content": "second"}]], client_id="tenant-s",
                       conversation_id="conv-s", tags={"k": "v"})
    assert isinstance(res, ScoreResults) and len(res) == 2
    assert res.request_id and res.snapshot_version == version
    assert [r.flagged["always"] for r in res] == [True, True]
    stored, _ = client.get_alerts(request_id=res.request_id)
    assert {a.input_index for a in stored} == {0, 1}
    for a in stored:
        assert a.request_kind == "score" and a.snapshot_version == version and a.detector_id == "always"
        assert (a.client_id, a.conversation_id, a.tags) == ("tenant-s", "conv-s", {"k": "v"})
        assert a.action == "alert" and a.alert_id and a.create_time is not None


def test_generate_events_carry_snapshot_version_and_metadata(client):
    version = client.get_server_info().snapshot_version
    ev = split(client.generate("hello", max_new_tokens=3, client_id="tenant-g", conversation_id="conv-g",
                               tags={"a": "b"}))
    (summary,) = ev[Summary]
    assert summary.finish_reason == "length" and summary.snapshot_version == version
    assert ev[Alert] and all(a.snapshot_version == version for a in ev[Alert] + summary.alerts)
    a = ev[Alert][0]
    assert a.request_kind == "generate" and a.request_id == summary.request_id
    assert (a.client_id, a.conversation_id, a.tags) == ("tenant-g", "conv-g", {"a": "b"})
    stored, _ = client.get_alerts(request_id=summary.request_id)
    assert {s.alert_id for s in stored} == {s.alert_id for s in ev[Alert]}
    assert all(s.request_kind == "generate" and s.snapshot_version == version for s in stored)


# ----------------------------------------------------------------------- interventions


def test_override_interventions_then_block(client):
    version = client.get_server_info().snapshot_version
    ev = split(client.generate("hello", max_new_tokens=5, client_id="trusted", policy_overrides=[
        {"detector_id": "always", "action": "block"},
        {"detector_id": "never", "threshold": 0.5},
    ]))
    overrides = [i for i in ev[Intervention] if i.kind == "override"]
    assert [o.override for o in overrides] == [OverrideInfo("always", None, "block"), OverrideInfo("never", 0.5, None)]
    for o in overrides:
        assert o.intervention_id and o.request_id and o.snapshot_version == version
        assert o.steering is None and o.client_id == "trusted" and o.create_time is not None
        assert o.detector_id == o.override.detector_id and o.token_index == 0
    blocks = [i for i in ev[Intervention] if i.kind == "block"]
    assert blocks and blocks[0].detector_id == "always" and blocks[0].override is None
    assert any(a.action == "block" and a.detector_id == "always" for a in ev[Alert])
    (summary,) = ev[Summary]
    assert summary.finish_reason == "blocked" and not ev[Token]
    assert len({i.intervention_id for i in ev[Intervention]}) == len(ev[Intervention])


def test_override_to_steer_streams_the_detectors_own_ablation(client):
    ev = split(client.generate("hello", max_new_tokens=3, client_id="trusted",
                               policy_overrides=[{"detector_id": "always", "action": "steer"}]))
    assert any(a.action == "steer" for a in ev[Alert] if a.detector_id == "always")
    steers = [i for i in ev[Intervention] if i.kind == "steer"]
    assert steers
    s = steers[0]
    assert s.detector_id == "always" and s.token_index == 0  # decided on the prompt: from the first token
    assert s.steering == SteeringInfo("ablate", "blocks.1.resid_post", 1.0, "always:direction", "all", "always")


def test_client_steering_from_the_start_and_triggered(setup, client):
    d = setup[1].d_model
    ev = split(client.generate("hello", max_new_tokens=3, client_id="trusted", steering=[
        {"vector": [1.0] * d, "hook_point": "blocks.0.resid_post", "kind": "add", "coefficient": 0.5,
         "positions": "all"},
        {"vector": np.arange(d, dtype=np.float32) + 1, "hook_point": "blocks.2.resid_post", "kind": "ablate",
         "coefficient": 0.25, "positions": "prompt", "trigger_detector_id": "always"},
        {"vector": [0.0] * (d - 1) + [1.0], "hook_point": "blocks.0.mlp_out", "kind": "add", "coefficient": 1.0},
    ]))
    steers = [i for i in ev[Intervention] if i.kind == "steer"]
    start = [i for i in steers if not i.detector_id]
    assert [i.steering for i in start] == [
        SteeringInfo("add", "blocks.0.resid_post", 0.5, "inline", "all", ""),
        SteeringInfo("add", "blocks.0.mlp_out", 1.0, "inline", "generated", ""),  # positions unset: generated
    ]
    assert all(i.token_index == 0 and i.intervention_id and i.snapshot_version for i in start)
    triggered = [i for i in steers if i.detector_id == "always"]
    assert len(triggered) == 1
    t = triggered[0]
    assert t.token_index == 0 and t.override is None  # triggered on the prompt: the request ran again with it
    assert t.steering == SteeringInfo("ablate", "blocks.2.resid_post", 0.25, "inline", "prompt", "always")
    assert ev[Summary][0].finish_reason == "length"


def test_untrusted_client_is_refused(setup, client):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("hi", max_new_tokens=1, client_id="nobody",
                             policy_overrides=[{"detector_id": "always", "action": "block"}]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("hi", max_new_tokens=1, steering=[
            {"vector": [1.0] * setup[1].d_model, "hook_point": "blocks.0.resid_post", "kind": "add"}]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ----------------------------------------------------------------------- finish reasons


def test_finish_reasons_stop_and_length(client):
    probe = client.generate_text("abc", max_new_tokens=4)
    assert probe.finish_reason == "length"
    text = probe.text
    assert text, "the tiny model produced no text to stop on"
    stopped = client.generate_text("abc", max_new_tokens=4, stop=[text[-1]])
    assert stopped.finish_reason == "stop" and stopped.completion_tokens <= 4


# ----------------------------------------------------------------------- async client


def test_async_client_has_the_same_methods(setup):
    target = setup[0].target

    async def go():
        async with AsyncClient(target, timeout=60) as c:
            info = await c.get_server_info()
            dets = await c.list_detectors()
            reloaded = await c.reload_detectors()
            res = await c.score(["async"])
            events = [e async for e in c.generate("hi", max_new_tokens=2, client_id="trusted",
                                                  policy_overrides=[{"detector_id": "never", "threshold": 0.9}])]
            summary = await c.generate_text("hi", max_new_tokens=1)
            alerts, _ = await c.get_alerts(request_id=res.request_id)
            return info, dets, reloaded, res, events, summary, alerts

    info, dets, reloaded, res, events, summary, alerts = asyncio.run(go())
    assert dets.snapshot_version == reloaded.snapshot_version == info.snapshot_version == res.snapshot_version
    assert isinstance(events[-1], Summary) and events[-1].snapshot_version == info.snapshot_version
    assert [i.override for i in events if isinstance(i, Intervention) and i.kind == "override"] == \
        [OverrideInfo("never", pytest.approx(0.9), None)]
    assert summary.finish_reason == "length" and alerts and alerts[0].request_kind == "score"


# ----------------------------------------------------------------------- enum tables


def test_every_wire_enum_number_has_a_domain_name():
    """Each proto enum's numbers map to the domain vocabulary (none reads unknown), both ways."""
    cases = [(pb.Action, lw._ACTION, set(ACTIONS)), (pb.InterventionKind, lw._INTERVENTION, set(INTERVENTION_KINDS)),
             (pb.RequestKind, lw._REQUEST_KIND, set(REQUEST_KINDS)), (pb.SteeringKind, lw._STEERING_KIND,
                                                                       set(STEERING_KINDS)),
             (pb.SteeringPositions, lw._POSITIONS, set(STEERING_POSITIONS)),
             (pb.FinishReason, lw._FINISH, set(FINISH_REASONS)),
             (pb.DetectorKind, lw._DETECTOR_KIND, {"linear_probe", "sae_feature", "mlp_probe"})]
    for enum, table, names in cases:
        numbers = [n for n in enum.values() if n]
        assert {lw._name(table, n) for n in numbers} == names, enum.DESCRIPTOR.name
    assert lw._name(lw._ACTION, 0) == "unspecified" and lw._name(lw._ACTION, 99) == "unknown(99)"
    assert lw._name(lw._POSITIONS, 0) == "generated"  # unset positions mean generated, as the server reads them
    # the client's tables are the server's tables, inverted
    assert {v: k for k, v in lw._ACTION.items()} == mapping.ACTION
    assert {v: k for k, v in lw._FINISH.items()} == mapping.FINISH


def test_request_enums_map_through_the_tables():
    req = lw.generate_request("p", client_id="c", policy_overrides=[
        {"detector_id": f"d{i}", "action": a} for i, a in enumerate(ACTIONS)
    ], steering=[{"vector_id": "v", "kind": k, "positions": p} for k in STEERING_KINDS for p in STEERING_POSITIONS])
    assert [o.action for o in req.policy_overrides] == [mapping.ACTION[a] for a in ACTIONS]
    assert not req.policy_overrides[0].HasField("threshold")
    got = [(s.kind, s.positions) for s in req.steering]
    assert got == [(mapping.STEERING_KIND[k], pb.SteeringPositions.Value(f"STEERING_POSITIONS_{p.upper()}"))
                   for k in STEERING_KINDS for p in STEERING_POSITIONS]
    o = lw.generate_request("p", policy_overrides=[{"detector_id": "x", "threshold": 0.25}]).policy_overrides[0]
    assert o.threshold == 0.25 and o.action == pb.ACTION_UNSPECIFIED
    s = lw.generate_request("p", steering=[{"vector": [1, 2], "hook_point": "blocks.0.resid_post"}]).steering[0]
    assert list(s.vector) == [1.0, 2.0] and s.kind == 0 and s.positions == 0


@pytest.mark.parametrize("kw, key", [
    ({"policy_overrides": [{"detector_id": "x", "action": "explode"}]}, "policy_overrides[0].action"),
    ({"policy_overrides": [{"detector_id": "x"}, {"detector_id": "y", "action": "BLOCK"}]},
     "policy_overrides[1].action"),
    ({"policy_overrides": [{"detector_id": "x", "treshold": 0.1}]}, "'treshold'"),
    ({"policy_overrides": [{"threshold": 0.1}]}, "'detector_id'"),
    ({"steering": [{"vector_id": "v", "kind": "multiply"}]}, "steering[0].kind"),
    ({"steering": [{"vector_id": "v", "kind": "add", "positions": "everywhere"}]}, "steering[0].positions"),
    ({"steering": [{"vector_id": "v", "kind": "add", "position": "all"}]}, "'position'"),
    ({"steering": ["add"]}, "steering[0]"),
])
def test_unknown_names_raise_value_error_naming_the_key(client, kw, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        lw.generate_request("p", **kw)
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        client.generate("p", **kw)  # raised at the call, before any RPC
