"""`latentwatch eval --causal` on a tiny random model saved to disk: the default table, --json,
--report, and every user error as one line (those that need no model, before it loads)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.runner import ModelRunner
from probes.kinds.mlp import MlpConfig, MlpProbe
from probes.pack import Manifest, ProbePack, shipped_packs
from tests.monitor.cli_helpers import error_line, run
from tests.monitor.server_fixtures import make_pack
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"model": a tiny llama folder, "pack": a linear probe `toy` for it, "mlp": an MLP probe, "data": prompts}."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    runner = ModelRunner.load(str(root / "model"), device="cpu")
    make_pack(runner, root / "pack", id="toy")
    linear = ProbePack.load(root / "pack")
    config = MlpConfig(hidden=4, epochs=2)
    probe = MlpProbe(config)
    probe.fit(np.random.default_rng(0).normal(size=(40, runner.d_model)).astype(np.float32), np.arange(40) % 2)
    manifest = Manifest.model_validate(
        {**linear.manifest.model_dump(), "id": "nonlinear", "kind": "mlp", "kind_config": config.model_dump()}
    )
    ProbePack(manifest, probe).save(root / "mlp")
    rows = [{"id": f"p{i}", "text": f"how do I hurt someone, case {i}", "label": 1} for i in range(3)]
    rows += [{"id": f"n{i}", "text": f"suggest a name for bakery number {i}", "label": 0} for i in range(3)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "harmful.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return {
        "model": root / "model",
        "pack": root / "pack",
        "mlp": root / "mlp",
        "data": root / "data.jsonl",
        "harmful": root / "harmful.jsonl",
    }


def causal(tiny, *args):
    return run(
        "eval",
        "--causal",
        "--pack",
        tiny["pack"],
        "--data",
        tiny["data"],
        "--model",
        tiny["model"],
        "--device",
        "cpu",
        "--prompts",
        2,
        "--max-new-tokens",
        3,
        "--coefficients",
        "-1,0,1",
        *args,
    )


def test_causal_prints_a_table_by_default(tiny):
    result = causal(tiny)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for shown in (
        "toy",
        "blocks.1.resid_post",
        "refusal (phrases)",
        "refusal (judge)",
        "probe score",
        "harmful",
        "harmless",
        "+1",
        "-1",
    ):
        assert shown in out, shown
    assert len([line for line in out.splitlines() if "harmful" in line or "harmless" in line]) == 6


def test_causal_json_and_report(tiny, tmp_path):
    result = causal(tiny, "--json", "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"]["coefficients"] == [-1.0, 0.0, 1.0] and data["params"]["prompts_per_set"] == 2
    assert len(data["results"]) == 6 and len(data["completions"]) == 12
    assert data["params"]["prompt_ids"] == {"harmful": ["p1", "p2"], "harmless": ["n1", "n2"]}
    for name in ("causal.html", "causal.csv", "causal.json", "causal.png"):
        assert (tmp_path / "report" / name).is_file(), name
    assert "causal.html" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "DATA"], "--causal steers along one detector's direction: name it with --detector ID"),
        (
            ["--pack", "MLP", "--data", "DATA"],
            "mlp: nonlinear is not a linear probe (its head is 'mlp', reading 4 directions)",
        ),
        (["--pack", "PACK", "--pack", "MLP", "--data", "DATA"], "--causal steers one detector at a time"),
        (["--pack", "PACK", "--data", "DATA", "--coefficients", "0.1,0.2"], "--coefficients: include 0"),
        (
            ["--pack", "PACK", "--data", "DATA", "--coefficients", "a,b"],
            "--coefficients: 'a,b' is not a comma-separated",
        ),
        (["--pack", "PACK", "--data", "DATA", "--prompts", "0"], "--prompts must be at least 1, got 0"),
        (["--pack", "PACK", "--data", "DATA", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--pack", "PACK", "--data", "DATA", "--compare", "PACK"], "--compare: the causal check steers one detector"),
        (["--pack", "PACK", "--data", "HARMFUL"], "--data: no harmless prompts (label 0)"),
        (["--pack", "PACK", "--data", "DATA", "--recipe", "harmful_intent"], "from --data FILE or from --recipe NAME"),
        (["--pack", "PACK"], "pack toy names no recipe: give --recipe harmful_intent or harmful_intent_v2 or --data"),
        (["--pack", "PACK", "--recipe", "deception"], "--recipe deception has no harmful and harmless prompts"),
        (["--detector", "no_such_probe"], "unknown detector id(s) ['no_such_probe']"),
    ],
)
def test_causal_user_errors_are_one_line_before_the_model_loads(tiny, no_model, args, message):
    paths = {"DATA": tiny["data"], "HARMFUL": tiny["harmful"], "PACK": tiny["pack"], "MLP": tiny["mlp"]}
    line = error_line(run("eval", "--causal", *[paths.get(a, a) for a in args]))
    assert message in line, line


def test_causal_options_without_causal_are_an_error(tiny, no_model):
    line = error_line(run("eval", "--pack", tiny["pack"], "--data", tiny["data"], "--prompts", 3))
    assert "--coefficients, --prompts and --max-new-tokens set up the causal check: add --causal" in line


def test_the_shipped_harmful_intent_recipe_holds_paired_causal_prompts():
    """`eval --causal --detector harmful_intent` reads the pack's own recipe's held-out pairs."""
    from probes.causal import CAUSAL_RECIPES, recipe_prompts
    from probes.recipes import RECIPES

    prov = ProbePack.load(shipped_packs()["harmful_intent"][0]).manifest.provenance
    assert prov["recipe"] in CAUSAL_RECIPES
    sets = recipe_prompts(RECIPES[prov["recipe"]](None, seed=prov["seed"]))
    assert len(sets["harmful"]) == len(sets["harmless"]) >= 16
    assert [e.group for e in sets["harmful"]] == [e.group for e in sets["harmless"]]
