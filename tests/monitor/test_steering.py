"""Steering changes exactly the rows and positions that asked, and nothing else."""

import numpy as np
import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.generation import Generation, Sampling
from monitor.runner import HookPass
from monitor.steering import Steering, SteeringPlan
from probes.kinds.base import ScoringHead
from tests.tiny import tiny_runner

POINT = HookPoint.parse("blocks.1.resid_post")


@pytest.fixture(scope="module")
def runner():
    return tiny_runner("qwen2")


def forward(runner, plan):
    """Logits of three prompts in one batch, and the activation at POINT after steering."""
    items = [runner.encode(t, chat=True) for t in ("first row here", "second", "third row, longest of all")]
    b = runner.batch(items)
    seen = {}
    with runner.attached([POINT]):
        runner.hook_pass = HookPass(plan=plan, capture={POINT: lambda h: seen.setdefault("h", h.clone())})
        with torch.inference_mode():
            logits = runner.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  position_ids=b["position_ids"]).logits
    return logits, seen["h"]


def plan_of(runner, *rows):
    plan = SteeringPlan(3, runner.device, runner.dtype)
    for row, steering in rows:
        plan.add(row, steering)
    return plan


@pytest.mark.parametrize("kind,coefficient", [("add", 8.0), ("ablate", 0.0)])
def test_no_op_steering_leaves_logits_bit_identical(runner, kind, coefficient):
    """A zero vector added at any strength, or any direction ablated with coefficient 0."""
    vector = torch.zeros(runner.d_model) if kind == "add" else torch.randn(runner.d_model)
    plan = plan_of(runner, *((row, Steering(POINT, kind, vector, coefficient)) for row in range(3)))
    assert torch.equal(forward(runner, plan)[0], forward(runner, None)[0])


def test_vector_is_added_only_to_the_rows_that_asked(runner):
    vec = torch.randn(runner.d_model)
    steered, h = forward(runner, plan_of(runner, (1, Steering(POINT, "add", vec, 4.0))))
    plain, h0 = forward(runner, None)
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[2], plain[2])
    torch.testing.assert_close(h[1] - h0[1], (4.0 * vec / vec.norm()).expand_as(h[1]), rtol=0, atol=1e-5)
    assert torch.equal(h[0], h0[0]) and torch.equal(h[2], h0[2])


def test_ablation_coefficient_is_the_share_of_the_projection_removed_per_row(runner):
    direction = torch.randn(runner.d_model, generator=torch.Generator().manual_seed(0))
    u = direction / direction.norm()
    plan = plan_of(runner, *((row, Steering(POINT, "ablate", direction, c)) for row, c in enumerate((0.0, 0.5, 1.0))))
    (steered, h), (plain, h0) = forward(runner, plan), forward(runner, None)
    proj, proj0 = h @ u, h0 @ u  # [rows, seq]
    assert torch.equal(steered[0], plain[0]) and torch.equal(h[0], h0[0])  # coefficient 0: a no-op
    assert proj0[1:].abs().max() > 1e-2  # there was a projection to remove (activations here are ~0.1)
    torch.testing.assert_close(proj[1], 0.5 * proj0[1], rtol=1e-4, atol=1e-8)
    assert proj[2].abs().max() < 1e-5
    orthogonal = h - proj[..., None] * u
    torch.testing.assert_close(orthogonal, h0 - proj0[..., None] * u, rtol=0, atol=1e-5)  # nothing else moved


def test_ablation_removes_the_component_along_the_direction(runner):
    direction = torch.randn(runner.d_model)
    unit = direction / direction.norm()
    probe = Detector("along", "1", POINT, ScoringHead(unit[:, None], torch.zeros(1)), aggregation="max")
    bank = DetectorBank([probe])
    items = [runner.encode("project me out", chat=True)]
    before = runner.score(items, bank, token_scores=True)[0].token_probs
    assert abs(before - 0.5).max() > 1e-3  # the component was there
    gen = Generation(runner, items, [Sampling(max_new_tokens=3)], bank, [[Steering(POINT, "ablate", direction)]])
    for events in gen:
        for ev in events:
            assert abs(ev.token_probs - 0.5).max() < 1e-5  # sigmoid(0): nothing left along u
    assert abs(gen.prompt_aggregate[0] - 0.5).max() < 1e-5


def test_positions_limit_steering_to_prompt_or_generated_tokens(runner):
    vec = torch.randn(runner.d_model)
    probe = Detector("along", "1", POINT, ScoringHead((vec / vec.norm())[:, None], torch.zeros(1)), aggregation="last")
    bank = DetectorBank([probe])
    items = [runner.encode("steer later", chat=True)] * 3

    def run(positions):
        steer = [[Steering(POINT, "add", vec, coefficient=50.0, positions=positions)]] if positions else None
        gen = Generation(runner, items[:1], [Sampling(max_new_tokens=2)], bank, steer)
        first = gen.step()[0]
        prompt = gen.prompt_aggregate[0][0]
        second = gen.step()[0]
        gen.close()
        return prompt, first.token_probs[0], second.token_probs[0]

    base = run(None)
    prompt_only, generated_only = run("prompt"), run("generated")
    assert prompt_only[0] > base[0] + 0.1  # the last prompt token was steered
    assert prompt_only[2] < generated_only[2] - 0.01  # generated tokens were not
    assert generated_only[0] == pytest.approx(base[0], abs=1e-6)  # prompt untouched
    assert generated_only[2] > 0.99  # the fed-back generated token was steered


def test_steering_switched_on_mid_generation_shifts_exactly_the_later_tokens(runner):
    vec = torch.randn(runner.d_model)
    bank = DetectorBank([Detector("along", "1", POINT, ScoringHead((vec / vec.norm())[:, None], torch.zeros(1)),
                                  aggregation="last")])
    items = [runner.encode("switch me on", chat=True), runner.encode("leave me alone", chat=True)]

    def run(switch_on: bool):
        gen = Generation(runner, items, [Sampling(max_new_tokens=4)] * 2, bank)
        out = {0: [], 1: []}
        for i, events in enumerate(gen):
            for e in events:
                out[e.row].append(e)
            if switch_on and i == 1:
                gen.steer(0, Steering(POINT, "add", vec, coefficient=2.0))
        return out

    def logit(e):
        p = e.token_probs.astype(np.float64)
        return np.log(p) - np.log1p(-p)

    plain, steered = run(False), run(True)
    assert [e.token_id for e in steered[1]] == [e.token_id for e in plain[1]]  # the other row never noticed
    assert all(np.array_equal(a.token_probs, b.token_probs) for a, b in zip(steered[1], plain[1]))
    assert all(np.array_equal(a.token_probs, b.token_probs) for a, b in zip(steered[0][:2], plain[0][:2]))
    # the third step feeds the same token on the same cache, so the probe along vec reads exactly +2
    np.testing.assert_allclose(logit(steered[0][2]) - logit(plain[0][2]), [2.0], atol=1e-4)


def test_bad_steering_is_refused():
    with pytest.raises(ValueError, match="zero vector"):
        Steering(POINT, "ablate", torch.zeros(4))
    with pytest.raises(ValueError, match="positions"):
        Steering(POINT, "add", torch.ones(4), positions="middle")
    with pytest.raises(ValueError, match="finite"):
        Steering(POINT, "add", torch.tensor([1.0, float("nan")]))
    for kind, coefficient in (("ablate", 1.5), ("ablate", -0.1), ("add", float("inf"))):
        with pytest.raises(ValueError, match="coefficient"):
            Steering(POINT, kind, torch.ones(4), coefficient)


def test_additive_coefficients_may_be_any_finite_value_and_ablation_any_share():
    for kind, coefficient in (("add", -30.0), ("add", 0.0), ("ablate", 0.0), ("ablate", 1.0)):
        assert Steering(POINT, kind, torch.ones(4), coefficient).coefficient == coefficient
