"""Policy files on a real server over loopback gRPC: every action, every condition, escalation to a
real HTTP moderation endpoint, shadow rules, hot reload. Detectors score a known constant, so a
rule fires by its condition alone."""

from __future__ import annotations

import textwrap

import grpc
import pytest

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc
from monitor.config import Settings
from monitor.errors import RequestError
from monitor.policy import DEFAULT_REFUSAL, PolicyError
from monitor.snapshot import build_snapshot
from monitor.storage import get_alerts, get_interventions
from tests.monitor.moderation_server import moderation_server
from tests.monitor.server_fixtures import RunningServer, runner, steady_pack

STEADY, LOW = 0.6, 0.2  # what the two detectors score on every token


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy")
    r = runner()
    packs = [steady_pack(r, tmp / "steady", id="steady", p=STEADY), steady_pack(r, tmp / "low", id="low", p=LOW)]
    steady_pack(r, tmp / "steady-v2", id="steady", p=LOW)  # a new version of `steady`, for shadow rules
    policy = tmp / "policy.yaml"
    policy.write_text("rules:\n  - {id: start, detector: steady, action: log}\n")
    settings = Settings(
        packs=packs,
        policy=policy,
        port=0,
        metrics_port=0,
        db=f"sqlite:///{tmp}/db.sqlite",
        generate={"max_batch": 8, "max_wait_ms": 20},
        max_new_tokens=64,
    )
    srv = RunningServer(settings, r)
    yield srv, policy, tmp
    srv.stop()


@pytest.fixture(scope="module")
def stub(setup):
    with grpc.insecure_channel(setup[0].target) as ch:
        yield pb_grpc.MonitorStub(ch)


def use(setup, text: str):
    """Write the policy file and reload it, as an operator would (the server also notices on its own)."""
    srv, path, _ = setup
    path.write_text(textwrap.dedent(text))
    return srv.run(srv.server.service.reload("test"))


def generate(stub, prompt="tell me a story", n=4, client="", tags=None):
    md = pb.RequestMetadata(client_id=client, tags=tags or {})
    return list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=n, metadata=md), timeout=60))


def trail(setup, request_id):
    srv = setup[0]
    srv.server.writer.flush(10)
    engine = srv.server.writer.engine
    return get_interventions(engine, request_id=request_id)[0], get_alerts(engine, request_id=request_id)[0]


def summary(events):
    return events[-1].summary


def interventions(events):
    return [e.intervention for e in events if e.WhichOneof("event") == "intervention"]


def test_block_rule_ends_blocked_with_the_refusal_and_its_record(setup, stub):
    snap = use(
        setup,
        """
        version: block-test
        rules:
          - {id: stop-steady, detector: steady, action: block, refusal: "Not that."}
    """,
    )
    events = generate(stub)
    s = summary(events)
    assert s.finish_reason == pb.FINISH_REASON_BLOCKED and s.refusal == "Not that." and s.text == ""
    assert s.policy_version == snap.policy_version and snap.policy_version.startswith("block-test@")
    (block,) = interventions(events)
    assert (block.kind, block.rule_id, block.outcome) == (pb.INTERVENTION_KIND_BLOCK, "stop-steady", "blocked")
    assert block.score == pytest.approx(STEADY, abs=1e-4) and block.policy_version == snap.policy_version
    records, alerts = trail(setup, s.request_id)
    assert [(r.kind, r.rule_id, r.outcome, r.policy_version) for r in records] == [
        ("block", "stop-steady", "blocked", snap.policy_version)
    ]
    assert [(a.rule_id, a.detector_id, a.action) for a in alerts] == [("stop-steady", "steady", "block")]


def test_default_refusal_and_a_rule_that_does_not_hold_lets_the_request_complete(setup, stub):
    use(
        setup,
        """
        rules:
          - {id: stop, detector: steady, action: block, when: {threshold: 0.55}}
          - {id: quiet, detector: low, action: block}
    """,
    )
    s = summary(generate(stub))
    assert s.finish_reason == pb.FINISH_REASON_BLOCKED and s.refusal == DEFAULT_REFUSAL
    use(
        setup,
        """
        rules:
          - {id: stop, detector: steady, action: block, when: {threshold: 0.65}}
    """,
    )
    s = summary(generate(stub))
    assert s.finish_reason == pb.FINISH_REASON_LENGTH and not s.refusal and not s.alerts


def test_log_records_the_score_only(setup, stub):
    use(setup, "rules:\n  - {id: note, detector: steady, action: log}\n")
    events = generate(stub)
    s = summary(events)
    assert s.finish_reason == pb.FINISH_REASON_LENGTH and not s.alerts
    (rec,) = interventions(events)
    assert (rec.kind, rec.outcome, rec.token_index) == (pb.INTERVENTION_KIND_LOG, "logged", 0)
    records, alerts = trail(setup, s.request_id)
    assert [r.kind for r in records] == ["log"] and alerts == []


def test_a_detector_no_acting_rule_names_still_alerts(setup, stub):
    """A policy adds actions; it cannot switch a loaded detector's monitoring off by leaving it out."""
    snap = use(setup, "rules:\n  - {id: note, detector: low, action: log, when: {threshold: 0.1}}\n")
    assert {r.id: r.action for r in snap.rules} == {"note": "log", "steady": "alert"}
    s = summary(generate(stub))
    assert [(a.detector_id, a.rule_id) for a in s.alerts] == [("steady", "steady")]


def test_band_fires_only_inside_low_high(setup, stub):
    use(
        setup,
        """
        rules:
          - {id: in-band, detector: steady, action: log, when: {band: [0.5, 0.7]}}
          - {id: above, detector: steady, action: log, when: {band: [0.7, 1.0]}}
          - {id: below, detector: low, action: log, when: {band: [0.1, 0.15]}}
          - {id: low-in-band, detector: low, action: log, when: {band: [0.15, 0.25]}}
    """,
    )
    assert [i.rule_id for i in interventions(generate(stub))] == ["in-band", "low-in-band"]


def test_where_and_min_tokens_decide_the_token_a_rule_fires_at(setup, stub):
    use(
        setup,
        """
        rules:
          - {id: on-prompt, detector: steady, action: log, when: {where: prompt}}
          - {id: first-completion, detector: steady, action: log, when: {where: completion}}
          - {id: third-completion, detector: steady, action: log, when: {where: completion, min_tokens: 3}}
          - {id: never, detector: steady, action: log, when: {where: prompt, min_tokens: 100000}}
    """,
    )
    got = {i.rule_id: i.token_index for i in interventions(generate(stub, n=6))}
    assert got == {"on-prompt": 0, "first-completion": 1, "third-completion": 3}


def test_rules_match_client_ids_and_tags(setup, stub):
    use(
        setup,
        """
        rules:
          - {id: for-app, detector: steady, action: block, match: {clients: [app]}}
          - {id: for-prod, detector: steady, action: log, match: {tags: {env: prod}}}
    """,
    )
    assert summary(generate(stub, client="app")).finish_reason == pb.FINISH_REASON_BLOCKED
    other = generate(stub, client="other", tags={"env": "prod"})
    assert summary(other).finish_reason == pb.FINISH_REASON_LENGTH
    assert [i.rule_id for i in interventions(other)] == ["for-prod"]
    assert interventions(generate(stub, client="other", tags={"env": "dev"})) == []


def test_steer_rule_switches_the_detectors_direction_off_from_the_next_token(setup, stub):
    use(
        setup,
        """
        rules:
          - {id: calm, detector: steady, action: steer, when: {where: completion, min_tokens: 2},
             steer: {direction: true, coefficient: 1.0}}
    """,
    )
    events = generate(stub, n=5)
    (st,) = interventions(events)
    assert (st.kind, st.rule_id, st.token_index, st.outcome) == (pb.INTERVENTION_KIND_STEER, "calm", 3, "steered")
    assert st.steering.kind == pb.STEERING_KIND_ABLATE and st.steering.vector_id == "steady:direction"
    assert summary(events).finish_reason == pb.FINISH_REASON_LENGTH


def test_shadow_rule_records_what_it_would_do_and_changes_no_response(setup, stub):
    use(setup, "rules:\n  - {id: base, detector: steady, action: log}\n")
    before = generate(stub, n=6)
    use(
        setup,
        """
        rules:
          - {id: base, detector: steady, action: log}
          - {id: trial, detector: steady, action: shadow, shadow: {pack: steady-v2, would: block},
             when: {threshold: 0.1}}
          - {id: trial-live, detector: steady, action: shadow}
    """,
    )
    after = generate(stub, n=6)

    def visible(events):
        return (
            [
                (e.WhichOneof("event"), e.token.text if e.HasField("token") else e.intervention.rule_id)
                for e in events[:-1]
            ],
            summary(events).text,
            summary(events).finish_reason,
        )

    assert visible(after) == visible(before)
    records, _ = trail(setup, summary(after).request_id)
    shadows = {r.rule_id: (r.shadow_action, round(r.score, 3)) for r in records if r.kind == "shadow"}
    assert shadows == {"trial": ("block", LOW), "trial-live": ("block", STEADY)}  # the shadow pack scores 0.2


def test_shadow_pack_must_be_a_version_of_the_rules_detector(setup):
    srv, path, tmp = setup
    path.write_text("rules:\n  - {id: t, detector: steady, action: shadow, shadow: {pack: low}}\n")
    with pytest.raises(ValueError, match=r"rules\[0\].shadow.pack: .* holds detector 'low', not 'steady'"):
        build_snapshot(srv.server.settings.model_copy(update={"policy": path}), srv.server.service.runner)


@pytest.fixture()
def moderation(setup):
    with moderation_server() as mod:
        yield mod


def escalation_policy(url, **rule):
    extra = "".join(f", {k}: {v}" for k, v in rule.items())
    return f"""
        escalations:
          mod: {{http: "{url}", timeout_ms: 2000}}
        rules:
          - {{id: second-opinion, detector: steady, action: escalate, when: {{band: [0.5, 0.7]}},
             escalate: {{endpoint: mod{extra}}}}}
    """


def escalations(events):
    return [i for i in interventions(events) if i.kind == pb.INTERVENTION_KIND_ESCALATE]


def test_escalation_flagged_blocks_and_clear_serves_on(setup, stub, moderation):
    use(setup, escalation_policy(moderation.url))
    flagged = generate(stub, prompt="how do I build a bomb", n=4)
    s = summary(flagged)
    (esc,) = escalations(flagged)
    assert s.finish_reason == pb.FINISH_REASON_BLOCKED and s.text == "" and s.refusal == DEFAULT_REFUSAL
    assert esc.escalation.flagged and esc.escalation.endpoint == "mod" and esc.outcome == "blocked"
    assert esc.escalation.latency_seconds > 0 and "illicit/violent" in esc.escalation.categories
    assert "build a bomb" in moderation.requests[-1].body["input"]

    clear = generate(stub, prompt="tell me about tulips", n=4)
    (esc,) = escalations(clear)
    assert summary(clear).finish_reason == pb.FINISH_REASON_LENGTH and len(summary(clear).text) > 0
    assert not esc.escalation.flagged and esc.outcome == "logged"
    m = setup[0].server.metrics
    assert m.value("latentwatch_escalations_total", {"endpoint": "mod", "verdict": "flagged"}) >= 1
    assert m.value("latentwatch_escalations_total", {"endpoint": "mod", "verdict": "clear"}) >= 1


def test_escalation_that_fails_serves_on_and_is_recorded_unless_fail_closed(setup, stub, moderation):
    moderation.stop()
    use(setup, escalation_policy(moderation.url))
    events = generate(stub, prompt="how do I build a bomb", n=4)
    (esc,) = escalations(events)
    assert summary(events).finish_reason == pb.FINISH_REASON_LENGTH
    assert esc.outcome == "failed_open" and esc.escalation.error == "connection refused"
    records, _ = trail(setup, summary(events).request_id)
    assert [(r.kind, r.outcome, r.escalation["error"]) for r in records] == [
        ("escalate", "failed_open", "connection refused")
    ]

    use(setup, escalation_policy(moderation.url, fail_closed="true"))
    events = generate(stub, prompt="tell me about tulips", n=4)
    assert summary(events).finish_reason == pb.FINISH_REASON_BLOCKED
    assert escalations(events)[0].outcome == "failed_closed"


def test_requests_outside_the_band_are_not_escalated(setup, stub, moderation):
    use(setup, escalation_policy(moderation.url).replace("[0.5, 0.7]", "[0.7, 0.9]"))
    events = generate(stub, prompt="how do I build a bomb", n=4)
    assert escalations(events) == [] and moderation.requests == []


def test_score_requests_follow_the_policy_too(setup, stub, moderation):
    use(
        setup,
        escalation_policy(moderation.url).rstrip(" ")
        + "          - {id: note, detector: low, action: log, when: {threshold: 0.1}}\n",
    )
    resp = stub.Score(
        pb.ScoreRequest(inputs=[pb.ScoreInput(text="how do I build a bomb"), pb.ScoreInput(text="tulips")]), timeout=60
    )
    records, alerts = trail(setup, resp.request_id)
    assert sorted((r.kind, r.outcome) for r in records) == [
        ("escalate", "alerted"),
        ("escalate", "logged"),
        ("log", "logged"),
        ("log", "logged"),
    ]
    assert [(a.rule_id, a.input_index, a.action) for a in alerts] == [("second-opinion", 0, "alert")]


def test_a_malformed_policy_is_refused_and_the_running_one_stays(setup, stub):
    srv, path, _ = setup
    good = use(setup, "rules:\n  - {id: note, detector: steady, action: log}\n")
    failed = srv.server.metrics.value("latentwatch_policy_reloads_total", {"result": "failed"})
    path.write_text("rules:\n  - {id: x, detector: steady, action: block, when: {threshold: 2}}\n")
    # the watcher tries the new file once on its own; waiting for it keeps the count below exact
    srv.run(_until(lambda: srv.server.metrics.value("latentwatch_policy_reloads_total", {"result": "failed"}) > failed))
    with pytest.raises(RequestError, match=r"rules\[0\].when.threshold: must be in \(0, 1\)"):
        srv.run(srv.server.service.reload("test"))
    with pytest.raises(grpc.RpcError) as e:
        stub.ReloadDetectors(pb.ReloadDetectorsRequest(), timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rules[0].when.threshold" in e.value.details()
    assert srv.server.service.snapshot.version == good.version
    assert srv.server.metrics.value("latentwatch_policy_reloads_total", {"result": "failed"}) == failed + 3
    assert [i.rule_id for i in interventions(generate(stub))] == ["note"]  # still the good policy


def test_the_server_reloads_a_changed_policy_file_by_itself(setup, stub):
    srv, path, _ = setup
    before = use(setup, "rules:\n  - {id: note, detector: steady, action: log}\n")
    path.write_text("rules:\n  - {id: renamed, detector: steady, action: log}\n")
    service = srv.server.service
    srv.run(_until(lambda: service.snapshot.version != before.version))
    assert [i.rule_id for i in interventions(generate(stub))] == ["renamed"]
    failed = srv.server.metrics.value("latentwatch_policy_reloads_total", {"result": "failed"})
    path.write_text("rules: [oops")  # a half-written file: logged, counted, the running policy stays
    srv.run(_until(lambda: srv.server.metrics.value("latentwatch_policy_reloads_total", {"result": "failed"}) > failed))
    assert [i.rule_id for i in interventions(generate(stub))] == ["renamed"]


def test_sighup_reloads_the_policy(setup, stub):
    srv, path, _ = setup
    before = use(setup, "rules:\n  - {id: note, detector: steady, action: log}\n")
    path.write_text("rules:\n  - {id: hup, detector: steady, action: log}\n")
    srv.loop.call_soon_threadsafe(srv.server.on_sighup)
    srv.run(_until(lambda: srv.server.service.snapshot.version != before.version))
    assert [i.rule_id for i in interventions(generate(stub))] == ["hup"]


async def _until(cond, timeout=30.0):
    import asyncio

    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_policy_and_detectors_settings_together_are_refused(setup):
    srv, path, _ = setup
    settings = srv.server.settings.model_copy(update={"detectors": {"steady": {"action": "block"}}})
    with pytest.raises(ValueError, match="per-detector policy is set in the policy file"):
        build_snapshot(settings, srv.server.service.runner)


def test_a_policy_naming_an_unloaded_detector_is_refused(setup):
    srv, path, tmp = setup
    bad = tmp / "unknown.yaml"
    bad.write_text("rules:\n  - {id: x, detector: nope, action: log}\n")
    with pytest.raises(ValueError, match=r"names detectors that are not loaded: \['nope'\]"):
        build_snapshot(srv.server.settings.model_copy(update={"policy": bad}), srv.server.service.runner)
    bad.write_text("rules:\n  - {id: x, detector: steady, action: lgo}\n")
    with pytest.raises(PolicyError, match=r"rules\[0\].action: Input should be"):
        build_snapshot(srv.server.settings.model_copy(update={"policy": bad}), srv.server.service.runner)


def test_a_request_cannot_override_with_a_policy_only_action(setup, stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=1, policy_overrides=[
            pb.DetectorPolicy(detector_id="steady", action=pb.ACTION_SHADOW)]), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("policy_overrides[0].action: a request may override with alert, steer")


def test_steering_decided_on_the_prompt_shapes_the_first_token_too(setup, stub):
    """The prompt's pass has sampled token 0 before the rule fired: the request runs again with the
    steering on from the start, and the discarded token is never streamed."""
    use(setup, """
        rules:
          - {id: calm, detector: steady, action: steer, when: {where: prompt}, steer: {direction: true}}
          - {id: note, detector: steady, action: log, when: {where: completion, min_tokens: 2}}
    """)
    events = generate(stub, n=5)
    tokens = [e.token.index for e in events if e.HasField("token")]
    assert tokens == [0, 1, 2, 3, 4] and summary(events).finish_reason == pb.FINISH_REASON_LENGTH
    steer, note = interventions(events)
    assert (steer.kind, steer.rule_id, steer.token_index) == (pb.INTERVENTION_KIND_STEER, "calm", 0)
    assert steer.steering.positions == pb.STEERING_POSITIONS_ALL
    assert (note.rule_id, note.token_index) == ("note", 2)  # rules carry on in the run that replaced it
    records, _ = trail(setup, summary(events).request_id)
    assert sorted(r.rule_id for r in records) == ["calm", "note"]  # the first run's decisions are not repeated


def test_steer_rule_with_a_vector_pack_changes_what_the_model_writes(setup, stub):
    import torch

    from monitor.domain import HookPoint
    from probes.fingerprint import fingerprint
    from probes.vectors import VectorPack, save_vector_pack

    srv, _, tmp = setup
    r = srv.server.service.runner
    vector = torch.randn(r.d_model, generator=torch.Generator().manual_seed(0))
    pack = VectorPack.create("push", {HookPoint.parse("blocks.0.resid_post"): vector}, method="diff_means",
                             model=fingerprint(r.model, r.tokenizer), default_coefficient=1.0, kind="add")
    save_vector_pack(pack, tmp / "push")
    use(setup, "rules:\n  - {id: base, detector: low, action: log, when: {threshold: 0.1}}\n")
    plain = summary(generate(stub, n=8)).text
    use(setup, """
        rules:
          - {id: push, detector: steady, action: steer, when: {where: prompt},
             steer: {vector: push, coefficient: 40}}
    """)
    events = generate(stub, n=8)
    (st,) = interventions(events)
    assert (st.steering.vector_id, st.steering.hook_point, st.token_index) == ("push@blocks.0.resid_post",
                                                                            "blocks.0.resid_post", 0)
    assert st.steering.coefficient == pytest.approx(40 * float(vector.norm()), rel=1e-5)
    assert summary(events).text != plain  # the first token included: the request ran again, steered


def test_a_detector_that_scores_nan_fires_every_rule_on_it_band_rules_too():
    """Fail closed: a NaN is no more outside a band than inside it, so nothing on a broken detector goes quiet."""
    import numpy as np

    from monitor.decisions import decide
    from monitor.snapshot import Rule

    rules = [Rule(0, "band", "1", "blocks.1.resid_post", 0.3, "escalate", high=0.7),
             Rule(0, "above", "1", "blocks.1.resid_post", 0.9, "block"),
             Rule(1, "fine", "1", "blocks.1.resid_post", 0.9, "block")]
    fired = decide(rules, np.array([np.nan, 0.5]), frozenset(), 0, 4)
    assert [(d.rule.id, d.score) for d in fired] == [("band", 1.0), ("above", 1.0)]


def _reading(pack_dir, reads: str):
    import json

    path = pack_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "reads": reads}))
    return pack_dir


def test_rules_that_do_not_say_where_read_what_the_pack_reads(tmp_path):
    """A request detector's implicit alert and its unqualified rules decide on the prompt; a detector
    trained on answers reads generated tokens only; `where` in a rule still wins."""
    r = runner()
    asks = _reading(steady_pack(r, tmp_path / "asks", id="asks"), "prompt")
    answers = _reading(steady_pack(r, tmp_path / "answers", id="answers"), "completion")
    plain = steady_pack(r, tmp_path / "plain", id="plain")
    snap = build_snapshot(Settings(packs=[asks, answers, plain], db="sqlite://"), r)
    where = {rule.id: (rule.where, snap.bank.detectors[rule.slot].id) for rule in snap.rules}
    assert where == {"asks": ("prompt", "asks"), "answers": ("completion", "answers@completion"),
                     "plain": ("both", "plain")}
    policy = tmp_path / "p.yaml"
    policy.write_text("rules:\n  - {id: a, detector: asks, action: block}\n"
                      "  - {id: b, detector: asks, action: log, when: {where: both}}\n")
    snap = build_snapshot(Settings(packs=[asks], policy=policy, db="sqlite://"), r)
    assert [(rule.id, rule.where) for rule in snap.rules] == [("a", "prompt"), ("b", "both")]
