"""Alert explanations: top tokens and SAE latents, on the device and the host, then over real loopback gRPC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from monitor.bank import Detector, DetectorBank
from monitor.client import Alert, Client, LatentActivation, Summary, Token, TokenContribution
from monitor.config import Settings
from monitor.domain import EXPLAIN_MAX_LATENTS, EXPLAIN_MAX_TEXT, EXPLAIN_MAX_TOKENS, HookPoint
from monitor.explain import explanation
from monitor.generation import Generation, Sampling
from monitor.runner import Encoded, HookPass
from monitor.sae import LatentHead, load_sae
from monitor.snapshot import Rule, Snapshot
from monitor.storage import AlertRecord
from probes.kinds.base import ScoringHead
from tests.monitor.sae import random_sae
from tests.monitor.server_fixtures import RunningServer, make_pack, runner

POINT = "blocks.1.resid_post"  # the SAE's hook point, and make_pack's
M = 8  # explain_latents default
CHAT = [{"role": "user", "content": "tell me about the lighthouse keeper"}]


def save_saelens(sae, folder):
    """An SAELens folder (cfg.json + sae_weights.safetensors), as the `saes` setting reads it."""
    folder.mkdir(parents=True)
    site = str(sae.hook_point).split(".")[-1]
    cfg = {"architecture": "standard", "d_in": sae.d_in, "d_sae": sae.d_sae, "apply_b_dec_to_input": False,
           "normalize_activations": "none", "metadata": {"hook_name": f"blocks.{sae.hook_point.layer}.hook_{site}"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: t.contiguous() for k, t in sae.tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def activations(r, ids: list[int], point: str = POINT) -> torch.Tensor:
    """[tokens, d_model] at `point` for one unpadded sequence, through the runner's own hook."""
    got = {}
    p = HookPoint.parse(point)
    with r.attached([p]):
        r.hook_pass = HookPass(capture={p: lambda h: got.setdefault("h", h[0].clone())}, stop_at=p)
        r.forward(r.batch([Encoded(ids, [(0, 0)] * len(ids), "")]), logits=False)
    return got["h"]


def top_latents(sae, h: torch.Tensor, m: int = M) -> list[tuple[int, float]]:
    act, idx = sae.encode(h).topk(m)
    return [(int(i), float(a)) for i, a in zip(idx, act) if a > 0]


def assert_latents(got: list[LatentActivation], sae_id: str, expected: list[tuple[int, float]]) -> None:
    assert expected and [la.sae_id for la in got] == [sae_id] * len(expected)
    assert [la.latent for la in got] == [i for i, _ in expected]
    assert [la.activation for la in got] == pytest.approx([a for _, a in expected], abs=1e-4)


def top_positions(scores, n: int = 5) -> list[int]:
    """Indices of the n highest scores, highest first; equal ones by index."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:n]


def affine(d: int, seed: int) -> ScoringHead:
    g = torch.Generator().manual_seed(seed)
    return ScoringHead(torch.randn(d, 1, generator=g) * 0.3, torch.randn(1, generator=g) * 0.1)


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine():
    """A tiny model; an SAE at blocks.1 read by a feature detector and a linear one; a linear one at blocks.2."""
    r = runner()
    sae = random_sae("relu", d_in=r.d_model, d_sae=64, point=POINT, seed=3)
    p1, p2 = HookPoint.parse(POINT), HookPoint.parse("blocks.2.resid_post")
    dets = [Detector("feature", "1", p1, LatentHead(sae, [4, 9, 17], [1.0, -0.5, 0.8], 0.1), aggregation="max"),
            Detector("linear", "1", p1, affine(r.d_model, 1), aggregation="mean"),
            Detector("deeper", "1", p2, affine(r.d_model, 2), aggregation="mean")]
    bank = DetectorBank(dets, saes={"sae": sae}, explain_tokens=5, explain_latents=M)
    return r, sae, bank


def test_only_detectors_with_an_sae_at_their_hook_point_get_latents(engine):
    r, sae, bank = engine
    assert bank.readout.pairs == [(0, "sae"), (1, "sae")]  # not "deeper": no SAE at blocks.2
    rows = np.zeros((2, M, 2))
    rows[:, 0] = [[3, 0.5], [7, 0.25]]
    assert bank.readout.of(2, rows) == [] and bank.readout.of(1, rows) == [("sae", 7, 0.25)]
    others = [DetectorBank(bank.detectors, saes={"sae": sae}, explain_latents=0),
              DetectorBank(bank.detectors[2:], saes={"sae": sae}, explain_latents=M),
              DetectorBank(bank.detectors)]
    assert all(b.readout is None for b in others)
    gen = Generation(r, [r.encode(messages=CHAT)], [Sampling(max_new_tokens=2)], others[1])
    assert all(ev.latents is None and ev.prompt_probs is None for evs in gen for ev in evs)  # nothing extra


def test_generation_reads_the_latents_at_each_steps_token_and_ships_the_prompts_scores(engine):
    r, sae, bank = engine
    enc = r.encode(messages=CHAT)
    events = [ev for evs in Generation(r, [enc], [Sampling(max_new_tokens=4)], bank) for ev in evs]
    ids = enc.ids + [ev.token_id for ev in events]
    h = activations(runner(), ids)
    for ev in events:  # the token a step reads: the last prompt token, then the previous generated one
        expected = top_latents(sae, h[len(enc) + ev.index - 1])
        for q in range(2):
            assert ev.latents[q, : len(expected), 0].tolist() == [i for i, _ in expected]
            assert ev.latents[q, : len(expected), 1] == pytest.approx([a for _, a in expected], abs=1e-4)
    [scored] = r.score([enc], bank, token_scores=True)
    assert events[0].prompt_probs == pytest.approx(scored.token_probs, abs=1e-6)
    assert all(ev.prompt_probs is None for ev in events[1:])


def test_score_reads_the_latents_at_each_detectors_highest_scoring_token(engine):
    r, sae, bank = engine
    items = [r.encode(text="a short one", chat=True), r.encode(messages=CHAT)]  # padded together
    for enc, res in zip(items, r.score(items, bank, token_scores=True)):
        h = activations(runner(), enc.ids)
        for q, (slot, _) in enumerate(bank.readout.pairs):
            peak = int(res.token_probs[:, slot].argmax())
            expected = top_latents(sae, h[enc.score_from + peak])
            assert res.latents[q, : len(expected), 0].tolist() == [i for i, _ in expected]
            assert res.latents[q, : len(expected), 1] == pytest.approx([a for _, a in expected], abs=1e-4)
    assert all(res.latents is None for res in r.score(items, bank))  # no token scores, no alert token


# ------------------------------------------------------------------------------ the host side


def test_top_tokens_rank_like_the_alerts_argmax_and_are_bounded(engine):
    _, _, bank = engine
    scores = np.array([[0.2], [0.9], [0.9], [np.nan], [0.1], [0.5], [0.3], [0.4]], dtype=np.float32)
    rows = np.zeros((2, M, 2))
    rows[0, :3] = [[5, 2.0], [1, 0.5], [2, 0.0]]
    got = explanation(bank, 0, np.repeat(scores, 3, 1), 10, lambda pos: f"t{pos}" * 40, rows)
    assert [t["position"] for t in got["tokens"]] == [13, 11, 12, 15, 17]  # NaN counts as 1.0; ties: earlier
    assert got["tokens"][0]["score"] == 1.0 and len(got["tokens"][1]["text"]) == EXPLAIN_MAX_TEXT
    assert got["latents"] == [{"sae_id": "sae", "latent": 5, "activation": 2.0},
                              {"sae_id": "sae", "latent": 1, "activation": 0.5}]  # inactive ones left out
    assert explanation(bank, 2, None, 0, str, rows) is None  # no tokens, no SAE at its hook point
    AlertRecord("r", "d", "1", 0.9, 0.5, explanation=got)  # what the record takes
    for bad in ({**got, "tokens": got["tokens"] * 7}, {**got, "latents": got["latents"] * 33},
                {**got, "tokens": [{**got["tokens"][0], "text": "x" * (EXPLAIN_MAX_TEXT + 1)}]}, {"tokens": []}):
        with pytest.raises(ValueError, match="explanation"):
            AlertRecord("r", "d", "1", 0.9, 0.5, explanation=bad)
    for name, cap in (("explain_tokens", EXPLAIN_MAX_TOKENS), ("explain_latents", EXPLAIN_MAX_LATENTS)):
        assert Settings(**{name: cap}) and Settings(**{name: 0})
        with pytest.raises(ValidationError, match=name):
            Settings(**{name: cap + 1})


# ------------------------------------------------------------------------------ over gRPC


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`always` at blocks.1 where an SAE is configured (`saes`), `elsewhere` at blocks.2 where none is."""
    tmp = tmp_path_factory.mktemp("explain")
    r = runner()
    folder = save_saelens(random_sae("relu", d_in=r.d_model, d_sae=64, point=POINT, seed=3), tmp / "sae-1")
    packs = [make_pack(r, tmp / "always", id="always", threshold=0.0),
             make_pack(r, tmp / "elsewhere", id="elsewhere", threshold=0.0, hook_point="blocks.2.resid_post", seed=1)]
    settings = Settings(packs=packs, saes=[str(folder)], port=0, metrics_port=0, db=f"sqlite:///{tmp}/db.sqlite",
                        score={"max_batch": 4, "max_wait_ms": 1}, generate={"max_batch": 4, "max_wait_ms": 1},
                        permissions={"lax": {"policy_overrides": True, "weaken_monitoring": True}})
    srv = RunningServer(settings, r)
    with Client(srv.target, timeout=60) as c:
        yield srv, c, load_sae(folder)
    srv.stop()


def stored(c, request_id) -> dict[str, Alert]:
    return {a.detector_id: a for a in c.get_alerts(request_id=request_id)[0]}


def expected_tokens(enc, probs, first: int) -> list[TokenContribution]:
    return [TokenContribution(first + j, enc.token_text(enc.score_from + j), float(probs[j]))
            for j in top_positions(list(probs))]


def test_a_generate_alert_lists_the_prompts_top_tokens_and_the_latents_where_it_fired(served):
    srv, c, sae = served
    events = list(c.generate(CHAT, max_new_tokens=3))
    alerts = {e.detector_id: e for e in events if isinstance(e, Alert)}
    summary = events[-1]
    assert isinstance(summary, Summary) and set(alerts) == {"always", "elsewhere"}
    assert all(a.token_index == 0 for a in alerts.values())  # raised on the prompt
    ref, snap = runner(), srv.server.service.snapshot
    enc = ref.encode(messages=CHAT)
    assert summary.prompt_tokens == len(enc)
    [scored] = ref.score([enc], snap.bank, token_scores=True)
    for name, a in alerts.items():
        slot = snap.by_id[name].slot
        want = expected_tokens(enc, scored.token_probs[:, slot], enc.score_from)  # positions count the prompt
        assert [(t.position, t.text) for t in a.explanation.tokens] == [(t.position, t.text) for t in want]
        assert [t.score for t in a.explanation.tokens] == pytest.approx([t.score for t in want], abs=1e-5)
    last = activations(ref, enc.ids)[-1]  # the token the alert fired on: the last one of the prompt
    assert_latents(alerts["always"].explanation.latents, "sae-1", top_latents(sae, last))
    assert alerts["elsewhere"].explanation.latents == []  # no SAE at blocks.2
    assert {k: a.explanation for k, a in stored(c, summary.request_id).items()} == \
        {k: a.explanation for k, a in alerts.items()}  # stored and returned as streamed


def test_an_alert_raised_on_a_generated_token_counts_it_after_the_prompt(served):
    """`always` takes the max over tokens: with its threshold between the prompt's max and the first
    generated token that beats it, it fires there, on the token the model had just read."""
    srv, c, sae = served
    ref, snap = runner(), srv.server.service.snapshot
    enc = ref.encode(text="hello")
    [prompt] = ref.score([enc], snap.bank, token_scores=True)
    slot = snap.by_id["always"].slot
    top = float(prompt.token_probs[:, slot].max())
    tokens = [e for e in c.generate("hello", max_new_tokens=8, include_token_scores=True) if isinstance(e, Token)]
    read = [t.scores["always"] for t in tokens]  # event i scored the token read at position len(enc) + i - 1
    i = next(i for i in range(2, len(read)) if read[i] > top and max(read[1:i]) < top)
    override = {"detector_id": "always", "threshold": (top + read[i]) / 2}
    [a] = [e for e in c.generate("hello", max_new_tokens=8, client_id="lax", policy_overrides=[override])
           if isinstance(e, Alert) and e.detector_id == "always"]
    assert a.token_index == i
    scores = list(prompt.token_probs[:, slot]) + read[1 : i + 1]
    ids = enc.ids + [t.token_id for t in tokens]
    assert [t.position for t in a.explanation.tokens] == top_positions(scores)
    assert a.explanation.tokens[0].position == len(enc) + i - 1
    assert [t.text for t in a.explanation.tokens] == [
        enc.token_text(pos) if pos < len(enc) else ref.tokenizer.decode([ids[pos]]) for pos in top_positions(scores)]
    assert_latents(a.explanation.latents, "sae-1", top_latents(sae, activations(ref, ids[: len(enc) + i])[-1]))


def test_a_score_alert_lists_the_inputs_top_tokens_and_the_latents_at_its_token(served):
    srv, c, sae = served
    texts = ["how do I get into a locked shed", "a second and longer input, so that the first one is padded"]
    results = c.score(texts, include_token_scores=True)
    alerts, _ = c.get_alerts(request_id=results.request_id)
    assert sorted((a.input_index, a.detector_id) for a in alerts) == [(0, "always"), (0, "elsewhere"),
                                                                      (1, "always"), (1, "elsewhere")]
    ref = runner()
    for a in alerts:
        enc = ref.encode(text=texts[a.input_index], chat=True)
        want = expected_tokens(enc, results[a.input_index].token_scores[a.detector_id], 0)  # as token_index
        assert [(t.position, t.text) for t in a.explanation.tokens] == [(t.position, t.text) for t in want]
        assert [t.score for t in a.explanation.tokens] == pytest.approx([t.score for t in want], abs=1e-5)
        assert a.explanation.tokens[0].position == a.token_index
        if a.detector_id == "always":
            h = activations(ref, enc.ids)[enc.score_from + a.token_index]
            assert_latents(a.explanation.latents, "sae-1", top_latents(sae, h))
        else:
            assert a.explanation.latents == []


def test_a_feature_detectors_alert_carries_latents_and_tokens_in_get_alerts(tmp_path):
    """A detector that reads an SAE's latent (its SAE joins the snapshot's SAEs, as build_snapshot adds it)."""
    r = runner()
    sae = random_sae("relu", d_in=r.d_model, d_sae=64, point=POINT, seed=5)
    det = Detector("feature", "1", HookPoint.parse(POINT), LatentHead.single(sae, 3, threshold=-1.0), aggregation="max")
    bank = DetectorBank([det], saes={"feat-sae": sae}, explain_tokens=3, explain_latents=4)
    srv = RunningServer(Settings(packs=[], port=0, metrics_port=0, db=f"sqlite:///{tmp_path}/db.sqlite"), r)
    try:
        srv.server.service._install(Snapshot("feature", bank, (Rule(0, "feature", "1", POINT, 0.5, "alert"),),
                                             saes={"feat-sae": sae}))
        with Client(srv.target, timeout=60) as c:
            summary = c.generate_text("raw text prompt", max_new_tokens=2)
            [score_alert] = stored(c, c.score(["score this"]).request_id).values()
            [gen_alert] = stored(c, summary.request_id).values()
    finally:
        srv.stop()
    ref = runner()
    enc = ref.encode(text="raw text prompt")
    assert [t.position for t in gen_alert.explanation.tokens] and len(gen_alert.explanation.tokens) == 3
    assert all(t.position < len(enc) and t.text == enc.token_text(t.position) for t in gen_alert.explanation.tokens)
    assert_latents(gen_alert.explanation.latents, "feat-sae", top_latents(sae, activations(ref, enc.ids)[-1], 4))
    enc = ref.encode(text="score this", chat=True)
    assert score_alert.explanation.tokens[0].position == score_alert.token_index
    h = activations(ref, enc.ids)[enc.score_from + score_alert.token_index]
    assert_latents(score_alert.explanation.latents, "feat-sae", top_latents(sae, h, 4))


def test_a_failing_explanation_never_costs_the_alert_its_record(monkeypatch, caplog):
    """The alert is recorded without an explanation; the failure is logged."""
    from monitor import explain

    def broken(*args):
        raise IndexError("token position past the end")

    monkeypatch.setattr(explain, "_explanation", broken)
    assert explain.explanation(None, 3, None, 0, str, None) is None
    assert "recorded without one" in caplog.text
