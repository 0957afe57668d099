"""Latent clamping over real loopback gRPC: an SAE from the `saes` setting, a clamp that changes
what the model writes, streamed and stored as an intervention, and every bad request refused."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from safetensors.torch import save_file

from latentwatch.v1 import monitor_pb2 as pb
from monitor import mapping
from monitor.bank import Detector, DetectorBank
from monitor.client import Client, Intervention, SteeringInfo, Summary
from monitor.config import Settings
from monitor.metrics import Metrics
from monitor.steering import Steering
from monitor.storage import get_interventions
from monitor.storage.journal import Journal
from monitor.trail import RequestContext, Trail
from probes.pack import load_packs
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

SAE_ID, D_SAE, LATENT, ALIGNED = "toy-sae", 16, 3, 0  # latent ALIGNED writes along detector "always"


def write_sae(folder, detector_dirs: torch.Tensor):
    """A ReLU SAE in SAELens' format at blocks.1.resid_post: orthonormal decoder rows, the first along
    a detector's direction, the rest orthogonal to every detector (so clamping them blinds none)."""
    d = detector_dirs.shape[0]
    basis = torch.cat([detector_dirs, torch.randn(d, d - detector_dirs.shape[1],
                                                  generator=torch.Generator().manual_seed(0))], dim=1)
    q, _ = torch.linalg.qr(basis)
    k = detector_dirs.shape[1]
    w_dec = torch.cat([q[:, :1], q[:, k:k + D_SAE - 1]], dim=1).T.contiguous()  # [d_sae, d]
    folder.mkdir()
    save_file({"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(D_SAE), "W_dec": w_dec, "b_dec": torch.zeros(d)},
              folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": D_SAE, "apply_b_dec_to_input": False,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clamp")
    r = runner()
    packs = [make_pack(r, tmp / "always", id="always", threshold=0.0),
             make_pack(r, tmp / "never", id="never", threshold=1.0, seed=1)]
    bank = DetectorBank([Detector.from_pack(p) for p in load_packs(packs)])
    dirs = torch.cat([bank.directions(i) for i in range(2)], dim=1)
    sae = write_sae(tmp / SAE_ID, dirs)
    settings = Settings(packs=packs, saes=[str(sae)], port=0, metrics_port=0, db=f"sqlite:///{tmp}/db.sqlite",
                        generate={"max_batch": 4, "max_wait_ms": 20}, max_new_tokens=64,
                        permissions={"trusted": {"steering": True},
                                     "blinder": {"steering": True, "steer_detector_directions": True}})
    srv = RunningServer(settings, r)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(setup):
    with Client(setup.target, timeout=30) as c:
        yield c


TRUSTED = pb.RequestMetadata(client_id="trusted")


def clamp(**kw) -> pb.SteeringRequest:
    return pb.SteeringRequest(**{"kind": pb.STEERING_KIND_CLAMP, "sae_id": SAE_ID, "latent": LATENT,
                                 "coefficient": 10.0, **kw})


def generate(client, steering=(), metadata=TRUSTED, **kw):
    return list(client.stub.Generate(pb.GenerateRequest(prompt="tell me", max_new_tokens=8, metadata=metadata,
                                                        steering=list(steering), **kw), timeout=30))


def tokens(events):
    return [e.token.token_id for e in events if e.WhichOneof("event") == "token"]


def stored(srv, request_id):
    srv.server.writer.flush(5.0)
    rows, _ = get_interventions(srv.server.writer.engine, request_id=request_id, page_size=100)
    return rows


def test_the_sae_is_loaded_from_the_saes_setting(setup):
    sae = setup.server.service.snapshot.saes[SAE_ID]
    assert sae.d_sae == D_SAE and str(sae.hook_point) == "blocks.1.resid_post"


def test_a_clamp_changes_generation_and_is_streamed_and_stored(setup, client):
    plain = generate(client)
    events = generate(client, [clamp(positions=pb.STEERING_POSITIONS_ALL)])
    assert tokens(events) != tokens(plain) and len(tokens(events)) == 8
    first = events[0].intervention
    assert first.kind == pb.INTERVENTION_KIND_STEER and first.token_index == 0 and first.detector_id == ""
    assert first.steering == pb.SteeringRequest(kind=pb.STEERING_KIND_CLAMP, sae_id=SAE_ID, latent=LATENT,
                                                coefficient=10.0, hook_point="blocks.1.resid_post",
                                                positions=pb.STEERING_POSITIONS_ALL)
    request_id = events[-1].summary.request_id
    [row] = [r for r in stored(setup, request_id) if r.kind == "steer"]
    assert row.intervention_id == first.intervention_id and row.steering_kind == "clamp"
    assert row.vector_id == f"{SAE_ID}:{LATENT}" and row.coefficient == 10.0
    assert row.details == {"positions": "all", "sae_id": SAE_ID, "latent": LATENT}
    assert mapping.intervention(row, first.metadata) == first  # stored and streamed read the same


def test_the_hook_point_may_be_given_if_it_is_the_saes(client):
    events = generate(client, [clamp(hook_point="blocks.1.resid_post")])
    assert events[0].intervention.steering.kind == pb.STEERING_KIND_CLAMP


def test_a_clamp_triggered_by_a_detector_starts_with_its_alert(setup, client):
    """The alert fires on the prompt, so the clamp runs from the first token (the request runs again)."""
    events = generate(client, [clamp(trigger_detector_id="always", coefficient=-4.0)])
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:3] == ["alert", "intervention", "intervention"]  # the alert, its decision, the clamp
    steer = events[2].intervention
    assert steer.kind == pb.INTERVENTION_KIND_STEER and steer.detector_id == "always" and steer.token_index == 0
    assert steer.steering.kind == pb.STEERING_KIND_CLAMP and steer.steering.coefficient == -4.0
    [row] = [r for r in stored(setup, events[-1].summary.request_id) if r.kind == "steer"]
    assert row.detector_id == "always" and row.details["latent"] == LATENT


def test_the_python_client_takes_a_clamp_dict(client):
    events = list(client.generate("tell me", max_new_tokens=2, client_id="trusted", steering=[
        {"kind": "clamp", "sae_id": SAE_ID, "latent": LATENT, "value": 6.5, "positions": "prompt"}]))
    [steer] = [e for e in events if isinstance(e, Intervention) and e.kind == "steer"]
    assert steer.steering == SteeringInfo("clamp", "blocks.1.resid_post", 6.5, "", "prompt", "", SAE_ID, LATENT)
    assert isinstance(events[-1], Summary)
    with pytest.raises(ValueError, match="value or coefficient"):
        client.generate_text("x", steering=[{"kind": "clamp", "sae_id": SAE_ID, "value": 1, "coefficient": 1}])


def _refused(client, code, steering, metadata=TRUSTED) -> str:
    with pytest.raises(grpc.RpcError) as e:
        generate(client, steering, metadata)
    assert e.value.code() == code, e.value.details()
    return e.value.details()


@pytest.mark.parametrize("steering, code, field", [
    (clamp(sae_id="nope"), grpc.StatusCode.NOT_FOUND, "steering[0].sae_id"),
    (clamp(sae_id=""), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].sae_id"),
    (clamp(latent=D_SAE), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].latent"),
    (clamp(coefficient=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].coefficient"),
    (clamp(coefficient=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].coefficient"),
    (clamp(vector=[1.0] * 32), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].vector"),
    (clamp(vector_id="v1"), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].vector_id"),
    (clamp(hook_point="blocks.0.resid_post"), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].hook_point"),
    (clamp(hook_point="blocks.99.resid_post"), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].hook_point"),
    (pb.SteeringRequest(kind=pb.STEERING_KIND_ADD, vector=[1.0] * 32, hook_point="blocks.2.resid_post",
                        sae_id=SAE_ID), grpc.StatusCode.INVALID_ARGUMENT, "steering[0].sae_id"),
])
def test_bad_clamps_name_the_field(client, steering, code, field):
    details = _refused(client, code, [steering])
    assert details.startswith(field) and "Traceback" not in details


def test_an_unknown_sae_lists_the_loaded_ones(client):
    assert repr(SAE_ID) in _refused(client, grpc.StatusCode.NOT_FOUND, [clamp(sae_id="nope")])


def test_clamping_needs_the_steering_permission(client):
    details = _refused(client, grpc.StatusCode.PERMISSION_DENIED, [clamp()], pb.RequestMetadata(client_id="nobody"))
    assert "steering" in details and "permission" in details


def test_clamping_a_latent_that_writes_along_a_detector_is_blinding(client):
    details = _refused(client, grpc.StatusCode.PERMISSION_DENIED, [clamp(latent=ALIGNED)])
    assert "steering[0].latent" in details and "'always'" in details and "steer_detector_directions" in details
    events = generate(client, [clamp(latent=ALIGNED)], pb.RequestMetadata(client_id="blinder"))
    assert events[0].intervention.steering.latent == ALIGNED  # granted: allowed, and on the trail


def test_a_clamp_record_survives_the_journal(setup, tmp_path):
    sae = setup.server.service.snapshot.saes[SAE_ID]
    rec = Trail(None, Metrics(), "m").steering(RequestContext("generate", "v"), Steering.clamp(sae, LATENT, 2.5), 0,
                                                trigger=None)
    journal = Journal(tmp_path / "journal").open()
    try:
        journal.append(rec)
        assert journal.read(10)[0].record == rec
    finally:
        journal.close()
