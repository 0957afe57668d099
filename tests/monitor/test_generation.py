"""Streaming generation: HF-identical tokens, batch invariance, KV cache, control between tokens."""

import numpy as np
import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.generation import Generation, Sampling, _hits_stop
from monitor.hooks import HookPoint
from probes.kinds.base import ScoringHead
from tests.tiny import tiny_runner

PROMPTS = ["Once upon a time", "Write a haiku about the sea and the long grey shore", "Why?"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def runner(request):
    return tiny_runner(request.param)


@pytest.fixture(scope="module")
def bank(runner):
    g = torch.Generator().manual_seed(0)
    head = ScoringHead(torch.randn(runner.d_model, 1, generator=g) * 0.2, torch.zeros(1))
    return DetectorBank([Detector("d", "1", HookPoint.parse("blocks.1.resid_post"), head, aggregation="mean")])


def collect(gen):
    out = {}
    for events in gen:
        for e in events:
            out.setdefault(e.row, []).append(e)
    return out


def test_greedy_tokens_match_hf_generate_for_each_prompt(runner, bank):
    items = [runner.encode(p) for p in PROMPTS]
    ours = collect(Generation(runner, items, [Sampling(max_new_tokens=8)] * 3, bank))
    for row, item in enumerate(items):
        ids = torch.tensor([item.ids])
        ref = runner.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    pad_token_id=runner.pad_id, eos_token_id=None)
        assert [e.token_id for e in ours[row]] == ref[0, ids.shape[1]:].tolist()


def test_batched_generation_scores_equal_single_prompt_generation(runner, bank):
    items = [runner.encode(p) for p in PROMPTS]
    batched = collect(Generation(runner, items, [Sampling(max_new_tokens=5)] * 3, bank))
    for row, item in enumerate(items):
        alone = collect(Generation(runner, [item], [Sampling(max_new_tokens=5)], bank))[0]
        assert [e.token_id for e in alone] == [e.token_id for e in batched[row]]
        for a, b in zip(alone, batched[row]):
            np.testing.assert_allclose(a.token_probs, b.token_probs, atol=1e-5)
            np.testing.assert_allclose(a.aggregate, b.aggregate, atol=1e-5)


def test_decode_steps_feed_one_token_and_reuse_the_cache(runner, bank, monkeypatch):
    widths = []
    real = runner.model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", spy)
    items = [runner.encode(p) for p in PROMPTS]
    collect(Generation(runner, items, [Sampling(max_new_tokens=4)] * 3, bank))
    assert widths == [max(len(i) for i in items), 1, 1, 1]


def test_stop_between_tokens_removes_only_that_request(runner, bank):
    items = [runner.encode(p) for p in PROMPTS]
    gen = Generation(runner, items, [Sampling(max_new_tokens=6)] * 3, bank)
    seen = {0: 0, 1: 0, 2: 0}
    for i, events in enumerate(gen):
        for e in events:
            seen[e.row] += 1
        if i == 1:
            gen.stop(1)
    assert seen == {0: 6, 1: 2, 2: 6}


def test_finish_reasons_and_per_request_lengths(runner, bank):
    items = [runner.encode(p) for p in PROMPTS[:2]]
    out = collect(Generation(runner, items, [Sampling(max_new_tokens=2), Sampling(max_new_tokens=5)], bank))
    assert [len(out[0]), len(out[1])] == [2, 5]
    assert out[0][-1].finish_reason == "length" and all(e.finish_reason is None for e in out[1][:-1])


def test_seeded_sampling_is_reproducible(runner, bank):
    items = [runner.encode(PROMPTS[0])]
    params = [Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=7)]
    a = [e.token_id for e in collect(Generation(runner, items, params, bank))[0]]
    b = [e.token_id for e in collect(Generation(runner, items, params, bank))[0]]
    assert a == b


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_new_tokens", 0),
                                          ("temperature", float("nan"))])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value})


def test_rows_keep_their_own_sampling_after_other_rows_finish(runner, bank):
    items = [runner.encode(p) for p in PROMPTS[:2]]
    seeded = Sampling(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    mixed = collect(Generation(runner, items, [Sampling(max_new_tokens=2), seeded], bank))
    alone = collect(Generation(runner, items[1:], [seeded], bank))
    assert len(mixed[0]) == 2
    assert [e.token_id for e in mixed[1]] == [e.token_id for e in alone[0]]


def test_requests_joining_mid_decode_get_the_same_tokens_and_scores_as_alone(runner, bank):
    first, late = runner.encode(PROMPTS[1]), runner.encode(PROMPTS[0])
    gen = Generation(runner, [first], [Sampling(max_new_tokens=6)], bank)
    out = {0: gen.step() + gen.step()}
    assert gen.can_join
    joined = gen.join([late], [Sampling(max_new_tokens=4)])
    assert [e.row for e in joined] == [1]
    out[1] = joined
    while not gen.done:
        for e in gen.step():
            out.setdefault(e.row, []).append(e)
    gen.close()
    for row, item, n in ((0, first, 6), (1, late, 4)):
        alone = collect(Generation(runner, [item], [Sampling(max_new_tokens=n)], bank))[0]
        assert [e.token_id for e in out[row]] == [e.token_id for e in alone]
        for a, b in zip(alone, out[row]):
            np.testing.assert_allclose(a.token_probs, b.token_probs, atol=1e-5)
            np.testing.assert_allclose(a.aggregate, b.aggregate, atol=1e-5)



def test_stop_sequences_end_a_request_at_their_first_appearance():
    runner = tiny_runner("gpt2")  # its random weights write text ("eee..."), so a stop sequence can occur
    item = runner.encode(PROMPTS[1])
    free = collect(Generation(runner, [item], [Sampling(max_new_tokens=12)]))[0]
    full = "".join(e.text for e in free)
    stop = full[1:3]
    stopped = collect(Generation(runner, [item], [Sampling(max_new_tokens=12, stop=(stop,))]))[0]
    text = "".join(e.text for e in stopped)
    assert stopped[-1].finish_reason == "stop" and text.find(stop) == len(text) - len(stop)
    assert [e.token_id for e in stopped] == [e.token_id for e in free[: len(stopped)]] and len(stopped) < len(free)


def test_stop_check_only_looks_at_text_that_could_complete_a_new_match():
    assert _hits_stop("abc STOP", 4, ("STOP",))
    assert _hits_stop("abc ST" + "OP", 2, ("STOP",))  # a match completed by the new characters
    assert not _hits_stop("STOP and more", 4, ("STOP",))  # an older match is not new
    assert not _hits_stop("abc STOP", 0, ("STOP",))
