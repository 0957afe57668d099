"""`latentwatch steer build | import | export | show` in their default table output and with --json, and every
user error as one `error:` line naming the option, on a tiny random llama saved to disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from monitor.runner import ModelRunner
from probes.vectors import VECTORS, load_vector_pack
from tests.monitor.cli_helpers import error_line, run, write_jsonl
from tests.monitor.server_fixtures import make_pack
from tests.tiny import tiny_model, tiny_tokenizer

REPENG = Path(__file__).parents[1] / "probes" / "fixtures" / "repeng" / "tiny_llama.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a tiny llama (+ tokenizer), a probe pack for it, two example files, a vector built on it."""
    root = tmp_path_factory.mktemp("steer")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    make_pack(ModelRunner.load(str(root / "model"), device="cpu"), root / "probe", hook_point="blocks.2.resid_post")
    pos = write_jsonl(root / "joy.jsonl", [{"text": f"what a wonderful day {i}"} for i in range(6)])
    neg = write_jsonl(root / "gloom.jsonl", [{"text": f"such a dreadful night {i}"} for i in range(6)])
    paths = {"model": root / "model", "probe": root / "probe", "pos": pos, "neg": neg, "root": root}
    result = run(
        "steer",
        "build",
        "--positive",
        pos,
        "--negative",
        neg,
        "--hook-point",
        "blocks.1.resid_post",
        "--hook-point",
        "blocks.2.resid_post",
        "--model",
        root / "model",
        "--out",
        root / "vec",
    )
    assert result.exit_code == 0, result.output
    return paths | {"vec": root / "vec", "build": result}


def build(tiny, *args):
    """`steer build` on the fixture's two example files, with `args` after them."""
    return run("steer", "build", "--positive", tiny["pos"], "--negative", tiny["neg"], *args)


# ---------------------------------------------------------------------------------- build


def test_build_prints_a_table_and_writes_a_pack(tiny):
    result = tiny["build"]
    out = result.stdout
    assert "vec: diff_means, add x 1, d_model 32 (LlamaForCausalLM, 3 blocks)" in out
    for column in ("hook point", "norm", "separation (d)", "cosine vs diff_means"):
        assert column in out
    assert "blocks.1.resid_post" in out and "blocks.2.resid_post" in out
    assert f"wrote {tiny['vec']}" in result.stderr and "6 positive, 6 negative" in result.stderr
    assert "collecting activations" in result.stderr  # the runner's progress bar
    pack = load_vector_pack(tiny["vec"], expect=ModelRunner.load(str(tiny["model"]), device="cpu").fingerprint)
    assert pack.id == "vec" and [str(p) for p in pack.directions] == ["blocks.1.resid_post", "blocks.2.resid_post"]
    assert [d.role for d in pack.manifest.provenance.data] == ["positive", "negative"]
    assert pack.manifest.provenance.data[0].rows == 6 and pack.manifest.provenance.data[0].path == str(tiny["pos"])


def test_build_json_with_pca_and_a_default_coefficient(tiny, tmp_path):
    result = build(
        tiny,
        "--hook-point",
        "blocks.2.resid_post",
        "--method",
        "pca",
        "--coefficient",
        "4",
        "--id",
        "joy",
        "--out",
        tmp_path / "v",
        "--model",
        tiny["model"],
        "--json",
    )
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["id"] == "joy" and m["method"] == "pca" and m["default_coefficient"] == 4.0
    assert m["provenance"]["params"]["pca"] == "paired"
    assert m["hook_points"][0]["cosine_diff_means"] is not None and len(m["vectors_sha256"]) == 64


def test_build_from_a_probe_defaults_to_its_hook_point(tiny, tmp_path):
    result = build(
        tiny, "--method", "probe", "--probe", tiny["probe"], "--out", tmp_path / "p", "--model", tiny["model"]
    )
    assert result.exit_code == 0, result.output
    assert "p: probe, add x 1" in result.stdout and "blocks.2.resid_post" in result.stdout
    assert load_vector_pack(tmp_path / "p").manifest.provenance.params["probe"]["id"] == "toy"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lat"], "--method 'lat': use one of diff_means, pca, probe"),
        (["--method", "probe"], "--method probe needs --probe PACK"),
        (["--probe", "x"], "--probe PACK goes with --method probe"),
        (["--pool", "max"], "--pool 'max': use one of last, mean"),
        (["--kind", "clamp"], "--kind 'clamp': use add or ablate"),
        (["--coefficient", "nan"], "--coefficient nan: give a finite number"),
        (["--kind", "ablate", "--coefficient", "2"], "--coefficient 2.0: an ablation removes a share"),
        (["--batch-size", "0"], "--batch-size 0: give a positive number"),
        (["--id", "Bad Id!"], "--id 'Bad Id!': use only a-z"),
        (["--hook-point", "layer.3"], "--hook-point: unknown hook point 'layer.3'"),
    ],
)
def test_build_option_errors_before_the_model_loads(tiny, no_model, args, message):
    hook = [] if "--hook-point" in args else ["--hook-point", "blocks.1.resid_post"]
    result = build(tiny, *hook, *args)
    assert message in error_line(result)


def test_build_file_errors_before_the_model_loads(tiny, no_model, tmp_path):
    base = ["steer", "build", "--negative", tiny["neg"], "--hook-point", "blocks.1.resid_post"]
    assert "--hook-point: give at least one" in error_line(build(tiny))
    assert f"{tmp_path / 'none.jsonl'}: no such file" in error_line(run(*base, "--positive", tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    assert f"{bad}:2: missing input" in error_line(run(*base, "--positive", bad))
    (tmp_path / "f").write_text("")
    assert f"--out {tmp_path / 'f'} is a file" in error_line(
        run(*base, "--positive", tiny["pos"], "--out", tmp_path / "f")
    )
    probe = ["--method", "probe", "--positive", tiny["pos"], "--negative", tiny["neg"]]
    assert "--probe: probe pack" in error_line(run("steer", "build", *probe, "--probe", tmp_path / "nope"))
    msg = error_line(run("steer", "build", *probe, "--probe", tiny["probe"], "--hook-point", "blocks.1.resid_post"))
    assert "--hook-point: probe" in msg and "reads blocks.2.resid_post" in msg


def test_build_hook_point_past_the_model(tiny):
    result = build(tiny, "--hook-point", "blocks.9.resid_post", "--model", tiny["model"])
    assert "--hook-point: hook point 'blocks.9.resid_post' is out of range: this model has blocks 0..2" in error_line(
        result
    )


# ------------------------------------------------------------------------------ show


def test_show_table_and_json(tiny):
    result = run("steer", "show", tiny["vec"])
    assert result.exit_code == 0, result.output
    assert "vec: diff_means" in result.stdout and "blocks.2.resid_post" in result.stdout
    result = run("steer", "show", tiny["vec"], "--json")
    m = json.loads(result.stdout)
    assert m["id"] == "vec" and [h["hook_point"] for h in m["hook_points"]] == [
        "blocks.1.resid_post",
        "blocks.2.resid_post",
    ]


def test_show_the_shipped_refusal_vector():
    result = run("steer", "show", "refusal")
    assert result.exit_code == 0, result.output
    assert "refusal: diff_means, add x" in result.stdout and "30 blocks" in result.stdout
    assert "refusal rate (all positions, greedy, 48 tokens): JBB harmful" in result.stdout  # recorded by the bench


def test_show_errors(tiny, tmp_path):
    msg = error_line(run("steer", "show", "no-such-vector"))
    assert "no-such-vector: no such file or folder" in msg and "refusal" in msg
    broken = tmp_path / "broken"
    shutil.copytree(tiny["vec"], broken)
    (broken / VECTORS).write_bytes(b"\x80\x04junk")
    assert f"{broken / VECTORS}: is a pickle" in error_line(run("steer", "show", broken))


# ----------------------------------------------------------------------- import / export


def test_import_then_export_round_trips_the_repeng_fixture(tmp_path, no_model):
    result = run("steer", "import", REPENG, "--out", tmp_path / "pack")
    assert result.exit_code == 0, result.output
    assert "tiny_llama: repeng, add x 1, d_model 32 (model type llama)" in result.stdout
    said = lambda r: " ".join(r.stderr.split())  # noqa: E731 - rich wraps at 80 columns, where the path puts it
    assert "blocks.2.resid_post" in result.stdout and f"wrote {tmp_path / 'pack'}" in said(result)
    result = run("steer", "export", tmp_path / "pack", "--out", tmp_path / "back.gguf")
    assert result.exit_code == 0, result.output
    assert "2 directions, layers 2, 1" in said(result) and "direction.0" not in result.stderr
    assert (tmp_path / "back.gguf").read_bytes() == REPENG.read_bytes()


def test_import_json_with_a_model_records_its_fingerprint(tiny, tmp_path):
    result = run(
        "steer", "import", REPENG, "--out", tmp_path / "pack", "--id", "mood", "--model", tiny["model"], "--json"
    )
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["id"] == "mood" and m["model"]["architecture"] == "LlamaForCausalLM" and m["method"] == "repeng"


def test_import_errors(tmp_path, no_model):
    assert f"{tmp_path / 'x.gguf'}: no such file" in error_line(run("steer", "import", tmp_path / "x.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but not really")
    assert f"{junk}: does not parse as GGUF" in error_line(run("steer", "import", junk))
    assert "--id 'A B': use only" in error_line(run("steer", "import", REPENG, "--id", "A B"))
    (tmp_path / "f").write_text("")
    assert "--out" in error_line(run("steer", "import", REPENG, "--out", tmp_path / "f"))


def test_import_for_a_model_it_was_not_made_for(tiny, tmp_path):
    path = tmp_path / "wide.gguf"
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_tensor("direction.1", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = error_line(run("steer", "import", path, "--model", tiny["model"]))
    assert f"{path}: made for a llama model with d_model 64, this model is a llama with d_model 32" in msg


def test_export_errors(tiny, tmp_path):
    assert "--out" in error_line(run("steer", "export", tiny["vec"], "--out", tmp_path))
    assert f"folder {tmp_path / 'no'} does not exist" in error_line(
        run("steer", "export", tiny["vec"], "--out", tmp_path / "no" / "v.gguf")
    )
    assert "no-such-vector: no such file or folder" in error_line(
        run("steer", "export", "no-such-vector", "--out", tmp_path / "v.gguf")
    )
    result = build(
        tiny,
        "--hook-point",
        "blocks.1.mlp_out",
        "--hook-point",
        "blocks.0.resid_post",
        "--model",
        tiny["model"],
        "--out",
        tmp_path / "mlp",
    )
    assert result.exit_code == 0, result.output
    msg = error_line(run("steer", "export", tmp_path / "mlp", "--out", tmp_path / "v.gguf"))
    assert "steers blocks.1.mlp_out; a repeng layer is a block's output" in msg


def test_export_of_block_0_warns_about_llama_cpp(tiny, tmp_path):
    result = build(tiny, "--hook-point", "blocks.0.resid_post", "--model", tiny["model"], "--out", tmp_path / "b0")
    assert result.exit_code == 0, result.output
    result = run("steer", "export", tmp_path / "b0", "--out", tmp_path / "b0.gguf")
    assert result.exit_code == 0, result.output
    assert "llama.cpp's loader rejects direction.0" in result.stderr
