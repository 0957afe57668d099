"""`latentwatch` commands in their default output format, on a tiny random model saved to disk.

Nothing here loads SmolLM2: commands that need a model get `--model FOLDER` (a 3-block llama),
and the checks that must happen before any model loads run with `ModelRunner.load` made to fail.
"""

from __future__ import annotations

import json
import math
import socket

import pytest

from monitor import cli
from monitor.runner import ModelRunner
from probes.pack import default_pack_dirs
from tests.monitor.cli_helpers import error_line, run, write_jsonl
from tests.monitor.server_fixtures import make_pack
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"model": folder of a tiny llama + tokenizer, "pack": a real probe pack `toy` made for it}."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    make_pack(ModelRunner.load(str(root / "model"), device="cpu"), root / "pack", id="toy")
    return {"model": root / "model", "pack": root / "pack"}


@pytest.fixture()
def labelled(tmp_path):
    rows = [{"id": f"p{i}", "text": f"how do I hurt someone, case {i}", "label": 1} for i in range(12)]
    rows += [{"id": f"n{i}", "text": f"suggest a name for bakery number {i}", "label": 0} for i in range(12)]
    return write_jsonl(tmp_path / "labelled.jsonl", rows)


# ---------------------------------------------------------------------------------- alerts


def test_alerts_prints_a_table_by_default(tmp_path):
    from monitor.storage import AlertRecord, RequestRecord, StorageWriter, open_database

    url = f"sqlite:///{tmp_path}/lw.db"
    writer = StorageWriter(open_database(url)).start()
    writer.submit(RequestRecord("req-123456789abc", "score", "tiny"))
    writer.submit(AlertRecord("req-123456789abc", "toy", "1", 0.93, 0.5, span_text="a bad span", client_id="c1"))
    assert writer.close(timeout=30) and writer.write_failures == 0
    result = run("alerts", "--db", url)
    assert result.exit_code == 0, result.output
    assert "toy@1" in result.stdout and "0.930" in result.stdout and "a bad span" in result.stdout
    assert "c1" in result.stdout


def test_alerts_show_what_explains_each_alert(tmp_path):
    from monitor.storage import AlertRecord, StorageWriter, open_database

    why = {"tokens": [{"position": 12, "text": " bomb", "score": 0.97}, {"position": 3, "text": "pipe", "score": 0.9}],
           "latents": [{"sae_id": "sae-18", "latent": 1234, "activation": 5.5}]}
    url = f"sqlite:///{tmp_path}/lw.db"
    writer = StorageWriter(open_database(url)).start()
    writer.submit(AlertRecord("req-1", "toy", "1", 0.93, 0.5, explanation=why))
    assert writer.close(timeout=30) and writer.write_failures == 0
    table = run("alerts", "--db", url)
    assert table.exit_code == 0, table.output
    assert "' bomb'@12 'pipe'@3" in table.stdout and "sae-18:1234" in table.stdout
    listed = run("alerts", "--db", url, "--format", "json")
    assert json.loads(listed.stdout)[0]["explanation"] == why


def test_alerts_refuses_a_database_that_does_not_exist(tmp_path):
    missing = tmp_path / "does" / "not" / "exist.db"
    assert "no database at" in error_line(run("alerts", "--db", f"sqlite:///{missing}"))
    assert not missing.exists() and not missing.parent.exists()


# ------------------------------------------------------------------------------------ eval


def test_eval_prints_a_table_by_default(tiny, labelled):
    result = run("eval", "--pack", tiny["pack"], "--data", labelled, "--model", tiny["model"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "toy" in result.stdout and "AUROC" in result.stdout and "labelled" in result.stdout


def test_eval_warns_when_a_pack_is_scored_on_another_recipes_held_out_sets(no_model):
    """The shipped harmful_intent trained on harmful_intent_v2, whose training rows hold most of the
    v1 recipe's test split: scoring it there would report numbers on rows it has seen."""
    result = run("eval", "--recipe", "harmful_intent", "--detector", "harmful_intent")
    assert isinstance(result.exception, AssertionError)  # it goes on to load the model: a warning, not an error
    assert "warning: harmful_intent was trained on the harmful_intent_v2 recipe" in " ".join(result.stderr.split())


def test_eval_report_writes_the_report_folder(tiny, labelled, tmp_path):
    result = run("eval", "--pack", tiny["pack"], "--data", labelled, "--model", tiny["model"], "--device", "cpu",
                 "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "index.html").is_file() and "AUROC" in result.stdout


# ----------------------------------------------------------------------------------- score


def test_score_writes_one_line_per_input(tiny, labelled, tmp_path):
    out = tmp_path / "scores.jsonl"
    result = run("score", "--input", labelled, "--output", out, "--pack", tiny["pack"], "--model", tiny["model"],
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 24 and lines[0]["id"] == "p0" and set(lines[0]["scores"]) == {"toy"}
    assert all(0.0 <= x["scores"]["toy"] <= 1.0 for x in lines)


def test_score_names_the_input_that_is_too_long(tiny, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, None, {"id": "big", "text": "word " * 10_000}])
    line = error_line(run("score", "--input", src, "--output", tmp_path / "o.jsonl", "--pack", tiny["pack"],
                          "--model", tiny["model"], "--device", "cpu"))
    assert f"{src}:3 (id big)" in line and "at most 256" in line and "shorten" in line


def test_score_detector_missing_from_the_given_packs_is_an_error(tiny, no_model, labelled, tmp_path):
    line = error_line(run("score", "--input", labelled, "--output", tmp_path / "o.jsonl", "--pack", tiny["pack"],
                          "--detector", "harmful_intent"))
    assert "harmful_intent" in line and "which hold toy" in line


def test_score_never_writes_nan(tiny, labelled, tmp_path, monkeypatch):
    real = ModelRunner.score

    def nan_for_the_second(self, items, bank, **kw):
        results = real(self, items, bank, **kw)
        results[1].probs[:] = math.nan
        return results

    monkeypatch.setattr(ModelRunner, "score", nan_for_the_second)
    out = tmp_path / "o.jsonl"
    line = error_line(run("score", "--input", labelled, "--output", out, "--pack", tiny["pack"], "--model",
                          tiny["model"], "--device", "cpu"), code=1)
    assert f"{labelled}:2 (id p1)" in line and "toy scored NaN" in line
    assert not out.exists()


# ------------------------------------------------------------------------------- detectors


def test_detectors_prints_a_table_by_default(no_model):
    result = run("detectors")
    assert result.exit_code == 0, result.output
    assert "harmful_intent" in result.stdout and "no (load by id)" in result.stdout


# ----------------------------------------------------------------------------------- train


@pytest.mark.parametrize("args, message", [
    (["--kind", "forest"], "unknown --kind 'forest'"),
    (["--hook-point", "layer.3"], "--hook-point: unknown hook point 'layer.3'"),
    (["--pool", "median"], "unknown --pool 'median'"),
    (["--answers", "kept"], "--answers: only for recipes whose rows the model writes (harmful_completion)"),
])
def test_train_checks_options_before_loading_the_model(no_model, labelled, tmp_path, args, message):
    assert message in error_line(run("train", "--data", labelled, "--out", tmp_path / "p", *args))


def test_train_checks_data_files_before_loading_the_model(no_model, labelled, tmp_path):
    line = error_line(run("train", "--data", labelled, "--eval", tmp_path / "nope.jsonl", "--out", tmp_path / "p"))
    assert "nope.jsonl: no such file" in line


def test_train_names_the_input_that_is_too_long(tiny, labelled, tmp_path):
    rows = [json.loads(x) for x in labelled.read_text().splitlines()]
    data = write_jsonl(tmp_path / "train.jsonl", [*rows[:2], {"text": "word " * 10_000, "label": 1}, *rows[2:]])
    line = error_line(run("train", "--data", data, "--out", tmp_path / "p", "--model", tiny["model"],
                          "--device", "cpu"))
    assert f"{data}:3" in line and "at most 256" in line


def test_train_by_default_sweeps_hook_points_and_poolings(tiny, labelled, tmp_path):
    from probes.pack import ProbePack

    result = run("train", "--data", labelled, "--out", tmp_path / "p", "--model", tiny["model"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "best of 6 candidate(s)" in result.stderr and "AUROC" in result.stdout
    sweep = ProbePack.load(tmp_path / "p").manifest.provenance["selection"]["sweep"]
    assert {(r["hook_point"], r["kind"], r["pool"]) for r in sweep} == {
        (f"blocks.{i}.resid_post", "logistic", pool) for i in range(3) for pool in ("mean", "last")}


# ----------------------------------------------------------------------------------- serve


def test_serve_help_shows_the_defaults():
    result = run("serve", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for shown in ("[default: 50051]", "[default: 9464]", "[default: 127.0.0.1]", "[default: alerts_only]",
                  "sqlite:///data/latentwatch.db", "SmolLM2-135M-Instruct", "--add-pack"):
        assert shown in text, shown


@pytest.fixture()
def serving(fake_serve):
    """`serve` up to the point where the server would start: returns the settings it would get."""
    got = fake_serve

    def start(*args, env=None):
        result = run("serve", "--port", 0, "--metrics-port", 0, *args, env=env)
        assert result.exit_code == 0, result.output
        return got.pop()

    return start


def test_add_pack_adds_to_the_shipped_packs_and_pack_replaces_them(serving, tiny, tmp_path, no_model):
    from monitor.snapshot import pack_dirs

    db = ["--db", f"sqlite:///{tmp_path}/lw.db"]
    added = serving("--add-pack", tiny["pack"], *db)
    assert added.packs is None and added.extra_packs == [tiny["pack"]]
    assert pack_dirs(added) == [*default_pack_dirs(), tiny["pack"]]
    replaced = serving("--pack", tiny["pack"], *db)
    assert replaced.packs == [tiny["pack"]] and replaced.extra_packs == []
    assert pack_dirs(replaced) == [tiny["pack"]]
    assert serving("--packs", tiny["pack"], *db).packs == [tiny["pack"]]  # the old spelling still works
    config = tmp_path / "settings.toml"
    config.write_text(f'packs = ["{tiny["pack"]}"]\n')
    both = serving("--config", config, "--add-pack", default_pack_dirs()[0], *db)
    assert pack_dirs(both) == [tiny["pack"], default_pack_dirs()[0]]


def test_serve_flags_left_out_keep_the_file_and_environment_values(serving, tmp_path, no_model):
    config = tmp_path / "settings.toml"
    config.write_text(f'db = "sqlite:///{tmp_path}/from_file.db"\nhost = "127.0.0.1"\n')
    settings = serving("--config", config, env={"LATENTWATCH_TEXT_POLICY": "never"})
    assert settings.db.endswith("from_file.db") and settings.text_policy == "never" and settings.port == 0


@pytest.fixture()
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_checks_everything_before_loading_the_model_in_order(no_model, tiny, tmp_path, busy_port):
    bad_manifest = tmp_path / "broken"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{not json")
    args = {"--port": 70000, "--pack": bad_manifest, "--db": "mysql://db/x", "--metrics-port": busy_port}

    def check(message):
        line = error_line(run("serve", *[str(x) for kv in args.items() for x in kv]))
        assert message in line, line

    check("invalid configuration: port: Input should be less than or equal to 65535")
    args["--port"] = 0
    check(f"probe pack {bad_manifest}: manifest.json is not valid JSON")
    args["--pack"] = tiny["pack"]
    check("unsupported database URL 'mysql://db/x'")
    args["--db"] = f"sqlite:///{tmp_path}/lw.db"
    check(f"cannot listen on 127.0.0.1:{busy_port} (Address already in use): stop what holds it or pick another "
          "--metrics-port")
    args["--port"], args["--metrics-port"] = busy_port, 0
    check("pick another --port")
    args["--port"] = args["--metrics-port"] = 5000
    check("port and metrics_port are both 5000")


@pytest.mark.parametrize("args, env, message", [
    ([], {"LATENTWATCH_SCORE__MAX_BATCH": "0"}, "score.max_batch: Input should be greater than or equal to 1"),
    (["--add-pack", "does/not/exist"], {}, "probe pack does/not/exist: no manifest.json found"),
    (["--text-policy", "sometimes"], {}, "text_policy: Input should be 'always', 'alerts_only' or 'never'"),
    (["--sae", "no-such-sae"], {}, "saes: no-such-sae: no such file or folder, and no shipped SAE has that id"),
])
def test_serve_settings_and_pack_errors_are_one_line(no_model, args, env, message):
    assert message in error_line(run("serve", "--port", 0, "--metrics-port", 0, *args, env=env))


def test_train_prints_a_completion_detectors_catch_curve_as_its_own_table(capsys):
    """Not as a held-out set with no rows: it is read in tokens generated, not n+/n-."""
    cli.print_metrics({"test": {"n_pos": 3, "n_neg": 2, "auroc": 0.9},
                       "catch_curve": {"let_through": 25, "asked": 337, "n_benign": 200, "catch_at_16": 0.12,
                                       "catch_at_32": 0.12, "catch_at_64": 0.16, "benign_fpr_at_64": 0.03,
                                       "median_tokens_to_detection": 11}})
    shown = capsys.readouterr().out
    assert "25 of 337 jailbreak-wrapped harmful requests" in " ".join(shown.split())
    assert "│ catch_curve" not in shown and "0.160" in shown and "0.030" in shown
