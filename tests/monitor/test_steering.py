"""Steering changes exactly the rows and positions that asked, and nothing else."""

import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.generation import Generation, Sampling
from monitor.hooks import HookPoint
from monitor.runner import HookPass
from monitor.steering import Steering, SteeringPlan
from probes.kinds.base import ScoringHead
from tests.tiny import tiny_runner

POINT = HookPoint.parse("blocks.1.resid_post")


@pytest.fixture(scope="module")
def runner():
    return tiny_runner("qwen2")


def logits_with(runner, plan):
    items = [runner.encode(t, chat=True) for t in ("first row here", "second", "third row, longest of all")]
    b = runner.batch(items)
    with runner.attached(plan.hook_points if plan else []):
        runner.hook_pass = HookPass(plan=plan)
        with torch.inference_mode():
            return runner.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"]).logits


def test_zero_vector_leaves_logits_bit_identical(runner):
    plan = SteeringPlan(3, runner.device, runner.dtype)
    for row in range(3):
        plan.add(row, Steering(POINT, "add", torch.zeros(runner.d_model), coefficient=8.0))
    assert torch.equal(logits_with(runner, plan), logits_with(runner, None))


def test_vector_changes_only_the_rows_that_asked(runner):
    plan = SteeringPlan(3, runner.device, runner.dtype)
    plan.add(1, Steering(POINT, "add", torch.randn(runner.d_model), coefficient=4.0))
    steered, plain = logits_with(runner, plan), logits_with(runner, None)
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[2], plain[2])
    assert not torch.allclose(steered[1], plain[1])


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


def test_steering_switched_on_mid_generation_affects_only_later_tokens(runner):
    vec = torch.randn(runner.d_model)
    items = [runner.encode("switch me on", chat=True), runner.encode("leave me alone", chat=True)]
    plain = {0: [], 1: []}
    for step in Generation(runner, items, [Sampling(max_new_tokens=6)] * 2):
        for e in step:
            plain[e.row].append(e.token_id)
    gen = Generation(runner, items, [Sampling(max_new_tokens=6)] * 2)
    out = {0: [], 1: []}
    for i, events in enumerate(gen):
        for e in events:
            out[e.row].append(e.token_id)
        if i == 1:
            gen.steer(0, Steering(POINT, "add", vec, coefficient=40.0))
    assert out[1] == plain[1]  # the other row never noticed
    assert out[0][:2] == plain[0][:2] and out[0] != plain[0]  # steered from the third token on


def test_bad_steering_is_refused():
    with pytest.raises(ValueError, match="zero vector"):
        Steering(POINT, "ablate", torch.zeros(4))
    with pytest.raises(ValueError, match="positions"):
        Steering(POINT, "add", torch.ones(4), positions="middle")
    with pytest.raises(ValueError, match="finite"):
        Steering(POINT, "add", torch.tensor([1.0, float("nan")]))
