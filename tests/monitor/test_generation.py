"""Streaming generation: HF-identical tokens, batch invariance, KV cache, control between tokens."""

import numpy as np
import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.generation import Generation, Sampling, _HoldBack
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


def test_steady_joining_keeps_the_kv_cache_as_wide_as_its_longest_row(runner, bank):
    """A batch that never drains must not grow by a column per step forever; results stay exact."""
    item = runner.encode(PROMPTS[1])
    gen = Generation(runner, [item], [Sampling(max_new_tokens=6)], bank)
    out, widths = {0: gen.step()}, []
    for _ in range(12):  # a new request every two steps, each living six
        for e in gen.join([item], [Sampling(max_new_tokens=6)]):
            out.setdefault(e.row, []).append(e)
        for _ in range(2):
            for e in gen.step():
                out.setdefault(e.row, []).append(e)
        widths.append(gen.mask.shape[1])
    while not gen.done:
        for e in gen.step():
            out.setdefault(e.row, []).append(e)
    gen.close()
    assert max(widths) <= len(item) + 6  # bounded by one request's prompt + completion, not by the run
    alone = collect(Generation(runner, [item], [Sampling(max_new_tokens=6)], bank))[0]
    for events in out.values():
        assert [e.token_id for e in events] == [e.token_id for e in alone]
        for a, b in zip(alone, events):
            np.testing.assert_allclose(a.aggregate, b.aggregate, atol=1e-5)


@pytest.fixture(scope="module")
def varied():
    """A tiny model whose greedy completion of PROMPTS[0] varies from token to token (most random
    tiny models repeat one character), with that completion."""
    runner = tiny_runner("llama", seed=3)
    item = runner.encode(PROMPTS[0])
    return runner, item, collect(Generation(runner, [item], [Sampling(max_new_tokens=16)]))[0]


def test_a_stop_string_spanning_tokens_is_never_streamed(varied):
    runner, item, free = varied
    full = "".join(e.text for e in free)
    spans = [(i, i + 4) for i in range(1, len(free) - 4)
             if all(len(e.text) == 1 for e in free[i : i + 4])]  # four tokens of one character each
    start, end = spans[0]
    stop = "".join(e.text for e in free[start:end])
    before = "".join(e.text for e in free[:start])
    assert full.find(stop) == len(before) > 0 and end < len(free)  # first seen mid-completion
    stopped = collect(Generation(runner, [item], [Sampling(max_new_tokens=16, stop=(stop,))]))[0]
    assert [e.token_id for e in stopped] == [e.token_id for e in free[:end]]
    assert [e.finish_reason for e in stopped] == [None] * (end - 1) + ["stop"]
    assert "".join(e.text for e in stopped) == before
    assert all(e.text == "" for e in stopped[start:])  # not even the stop string's first part


def test_text_held_as_a_possible_stop_string_is_released_once_ruled_out(varied):
    runner, item, free = varied
    full = "".join(e.text for e in free)
    a, b = free[-2].text, free[-1].text  # the completion ends in "~8", which also occurs earlier
    assert len(a) == len(b) == 1 and full.count(a + b) > 1
    stop = a + b + "\x7f"  # never completed
    held = collect(Generation(runner, [item], [Sampling(max_new_tokens=16, stop=(stop,))]))[0]
    assert [e.token_id for e in held] == [e.token_id for e in free] and held[-1].finish_reason == "length"
    assert "".join(e.text for e in held) == full  # everything, including the held tail at "length"
    k = [e.text for e in free].index(a)
    assert [e.text for e in held[k : k + 3]] == ["", "", a + b + free[k + 2].text]
    assert held[-1].text == a + b and held[-2].text == ""


@pytest.mark.parametrize("pieces,stops,released,hit", [
    (["abc STO", "P more"], ("STOP",), ["abc ", ""], True),  # the final piece ends mid-stop
    (["abc ST", "ep"], ("STOP",), ["abc ", "STep"], False),  # ruled out: released with the next piece
    (["aaa", "ab"], ("aaab",), ["", "a"], True),  # KMP fallback: "aaaa" still ends in the prefix "aaa"
    (["xbc", "d"], ("xbcz", "bcd"), ["", "x"], True),  # "x", held for "xbcz", goes out when "bcd" ends
    (["ab", "c"], ("abc", "bc"), ["", ""], True),  # both end at "c": the longer is removed
    (["tail"], (), ["tail"], False),
])
def test_hold_back_releases_exactly_the_text_before_a_stop_string(pieces, stops, released, hit):
    hold = _HoldBack(stops)
    out = [hold.feed(p) for p in pieces]
    assert [t for t, _ in out] == released and [h for _, h in out] == [False] * (len(pieces) - 1) + [hit]


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="stop"):
        Sampling(stop=("",))
