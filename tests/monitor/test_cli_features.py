"""`latentwatch features search` on a tiny llama saved to disk and an SAE folder in SAELens' format: each
output format in its default form, the HTML page rendered offline by headless Chromium, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from monitor.cli_features import app
from tests.monitor.cli_helpers import error_line, write_jsonl
from tests.monitor.sae import random_sae
from tests.probes.test_features import MARKER, texts
from tests.probes.test_report import CHROMIUM_FLAGS, chromium
from tests.tiny import tiny_model, tiny_tokenizer


def saelens_folder(folder, sae, hook_name: str):
    """`sae` written as sae-lens writes a standard (ReLU) SAE."""
    folder.mkdir(parents=True)
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "architecture": "standard", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "metadata": {"hook_name": hook_name}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sae.tensors.items()}, folder / "sae_weights.safetensors")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny llama folder, SAE folders (one that fits it, two that do not) and the two example sets."""
    root = tmp_path_factory.mktemp("features")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    fits = random_sae("relu", d_in=32, point="blocks.1.resid_post")
    return {
        "model": root / "model",
        "sae": saelens_folder(root / "sae", fits, "blocks.1.hook_resid_post"),
        "narrow": saelens_folder(root / "narrow", random_sae("relu", d_in=16), "blocks.1.hook_resid_post"),
        "deep": saelens_folder(root / "deep", fits, "blocks.7.hook_resid_post"),
        # a "<" marker: token text must come out escaped in the page
        "positive": write_jsonl(root / "pos.jsonl", [{"text": t.replace(MARKER, "<b>")}
                                                     for t in texts(6, True, seed=1)]),
        "negative": write_jsonl(root / "neg.jsonl", [{"text": t} for t in texts(6, False, seed=2)]),
    }


def search(files, *args, model=True):
    base = ["search", "--positive", files["positive"], "--negative", files["negative"], "--sae", files["sae"]]
    extra = ["--model", files["model"], "--device", "cpu"] if model else []
    return CliRunner().invoke(app, [str(a) for a in [*base, *extra, *args]])


def test_table_by_default(files):
    result = search(files)
    assert result.exit_code == 0, result.output
    header = ("latent", "AUROC", "Cohen's d", "ex+ fire", "ex- fire", "tok+ fire", "tok- fire", "top tokens")
    assert all(h in result.stdout for h in header)
    rows = [line for line in result.stdout.splitlines() if re.match(r"^│\s+\d+\s+│", line)]
    assert len(rows) == 20  # --top 20


def test_json_lists_the_top_latents_with_their_contexts(files):
    result = search(files, "--format", "json")
    assert result.exit_code == 0, result.output
    latents = json.loads(result.stdout)
    assert len(latents) == 20 and len({la["latent"] for la in latents}) == 20
    aurocs = [round(abs(la["auroc"] - 0.5), 9) for la in latents]
    assert aurocs == sorted(aurocs, reverse=True)
    for la in latents:
        assert {"latent", "auroc", "cohens_d", "fire_rate_pos", "fire_rate_neg", "mean_max_pos", "mean_max_neg",
                "top_tokens"} <= set(la)
        assert len(la["top_tokens"]) <= 8
        for t in la["top_tokens"]:
            assert {"text", "activation", "example", "token", "context"} <= set(t) and t["set"] in ("positive",
                                                                                                  "negative")
            assert t["context"][t["at"]] == {"text": t["text"], "activation": t["activation"]}


def test_html_writes_latent_cards_that_render_offline_in_headless_chromium(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = search(files, "--format", "html", "--top", "5", "--contexts", "3")
    assert result.exit_code == 0, result.output
    page = tmp_path / "features.html"  # the default --out
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(\s*["']?(https?:|//)|@import""", html)
    for text in (str(files["sae"]), "blocks.1.resid_post", str(files["model"]), "pos.jsonl", "neg.jsonl"):
        assert text in html  # the header says what was compared

    proc = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("rendered") == "1", f"the page's load check did not run: {body.group(0)}"
    assert len(re.findall(r'<section class="card" id="latent-\d+">', proc.stdout)) == 5
    assert int(attrs["images"]) >= 1 and attrs["images-ok"] == attrs["images"]  # every histogram decoded
    assert int(attrs["tokens"]) > 0 and attrs["tokens-coloured"] == attrs["tokens"]
    assert "<b>" not in proc.stdout.split("<main>", 1)[1]  # token text is escaped, never markup


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "csv"], "unknown --format 'csv'; use table, json, html"),
    (["--sort", "size"], "unknown --sort 'size'; use auroc or d"),
    (["--top", "0"], "--top must be at least 1, got 0"),
    (["--out", "x.txt"], "--out writes json or html: add --format json or --format html"),
])
def test_options_are_checked_before_the_model_loads(files, no_model, args, message):  # noqa: F811
    assert error_line(search(files, *args, model=False)) == f"error: {message}"


def test_data_files_are_checked_before_the_model_loads(files, no_model, tmp_path):  # noqa: F811
    def error(**paths):
        args = [x for flag, p in paths.items() for x in (f"--{flag}", p)]
        return error_line(CliRunner().invoke(app, [str(a) for a in ["search", "--sae", files["sae"], *args]]))

    missing = tmp_path / "nope.jsonl"
    assert error(positive=missing, negative=files["negative"]) == f"error: {missing}: no such file"
    empty = write_jsonl(tmp_path / "empty.jsonl", [None])
    assert error(positive=files["positive"], negative=empty).endswith("empty.jsonl: file is empty (expected one "
                                                                       "JSON object per line)")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, None, {"prompt": "not an example"}])
    assert error(positive=bad, negative=files["negative"]).startswith(f"error: {bad}:3: missing input")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    assert error(positive=files["positive"], negative=tmp_path / "broken.jsonl").startswith(
        f"error: {tmp_path / 'broken.jsonl'}:2: not valid JSON")
    line = error_line(CliRunner().invoke(app, ["search", "--positive", str(files["positive"]), "--negative",
                                               str(files["negative"]), "--sae", str(tmp_path / "no-sae")]))
    assert line == f"error: {tmp_path / 'no-sae'}: no such file or folder"


def test_an_sae_that_does_not_fit_the_model_is_one_line_naming_both(files):
    line = error_line(search(files, "--sae", files["narrow"]))
    assert re.fullmatch(r"error: \S+narrow/sae_weights\.safetensors: the SAE reads blocks\.1\.resid_post "
                        r"activations of size d_in=16, but \S+model has d_model=32 there", line), line
    line = error_line(search(files, "--sae", files["deep"]))
    assert re.fullmatch(r"error: \S+deep/sae_weights\.safetensors: the SAE reads blocks\.7\.resid_post, but "
                        r"\S+model has blocks 0\.\.2", line), line


def test_an_example_with_nothing_to_read_is_named_by_file_and_line(files, tmp_path):
    neg = write_jsonl(tmp_path / "neg.jsonl", [{"text": "a dog"}, None, {"text": "<|im_end|>", "id": "x"}])
    line = error_line(search(files, "--negative", neg, "--raw"))
    assert line.startswith(f"error: {neg}:3 (id x): no tokens left to read")
