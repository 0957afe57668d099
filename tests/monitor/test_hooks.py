"""Hook points read exactly what Hugging Face computes, on every supported family."""

import pytest
import torch

from monitor.domain import HookPoint, HookPointError
from monitor.hooks import ADAPTERS, HookMap
from monitor.runner import HookPass
from tests.tiny import CONFIGS, tiny_runner

FAMILIES = sorted(CONFIGS)


def capture_all(runner, batch, points):
    seen = {}

    def keep(p):
        def fn(h):
            seen[p] = h.detach().clone()

        return fn

    with runner.attached(points):
        runner.hook_pass = HookPass(capture={p: keep(p) for p in points})
        runner.forward(batch, logits=False)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_post_matches_output_hidden_states(family):
    runner = tiny_runner(family)
    batch = runner.batch([runner.encode("The quick brown fox jumps.")])
    layers = runner.hooks.num_layers
    points = [HookPoint.parse(f"blocks.{i}.resid_post") for i in range(layers)]
    points += [HookPoint.parse(f"blocks.{i}.resid_pre") for i in range(layers)]
    seen = capture_all(runner, batch, points)
    with torch.inference_mode():
        ref = runner.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    for i in range(layers - 1):  # HF applies the final norm to the last entry
        torch.testing.assert_close(seen[points[i]], ref[i + 1], rtol=1e-5, atol=1e-5)
    for i in range(layers):
        torch.testing.assert_close(seen[points[layers + i]], ref[i], rtol=1e-5, atol=1e-5)
    final_norm = runner.model.base_model.norm if family != "gpt2" else runner.model.transformer.ln_f
    with torch.inference_mode():
        torch.testing.assert_close(final_norm(seen[points[layers - 1]]), ref[layers], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_mlp_out_sum_to_the_residual_update(family):
    runner = tiny_runner(family)
    batch = runner.batch([runner.encode("Residual streams add up.")])
    names = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    points = [HookPoint.parse(f"blocks.1.{n}") for n in names]
    seen = capture_all(runner, batch, points)
    pre, attn, mlp, post = (seen[p] for p in points)
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)


def test_unknown_hook_point_lists_what_exists():
    runner = tiny_runner("llama")
    with pytest.raises(HookPointError, match="resid_pre, attn_out, mlp_out, resid_post"):
        runner.hooks.resolve("blocks.0.resid_mid")
    with pytest.raises(HookPointError, match="blocks 0..2"):
        runner.hooks.resolve("blocks.7.resid_post")


def test_unknown_architecture_lists_supported_families():
    model = tiny_runner("llama").model
    model.config.model_type = "mamba"
    with pytest.raises(HookPointError, match="gemma2, gpt2, llama"):
        HookMap(model)


def test_hook_points_order_by_depth():
    names = ["blocks.2.resid_pre", "blocks.1.resid_post", "blocks.1.attn_out", "blocks.1.mlp_out"]
    assert [str(p) for p in sorted(map(HookPoint.parse, names))] == [
        "blocks.1.attn_out", "blocks.1.mlp_out", "blocks.1.resid_post", "blocks.2.resid_pre"]
    assert set(ADAPTERS) >= {"llama", "qwen2", "gemma2", "gpt2", "mixtral", "qwen2_moe"}
