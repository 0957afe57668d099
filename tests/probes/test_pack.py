"""Probe packs round-trip, and every unsafe or mismatched pack is refused with its own message."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from probes.fingerprint import ModelFingerprint, fingerprint
from probes.kinds.base import ScoringHead
from probes.kinds.logistic import LogisticProbe
from probes.kinds.mlp import MlpConfig, MlpProbe
from probes.pack import (
    Aggregation,
    Calibration,
    Manifest,
    PackError,
    ProbePack,
    check_inputs,
    default_pack_dirs,
    head_problem,
    load_packs,
    shipped_packs,
    shipped_packs_dir,
)

D = 16


def model_fp(**overrides) -> ModelFingerprint:
    fields = {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": 4,
        "d_model": D,
        "vocab_size": 128,
        "tokenizer_sha256": "ab" * 32,
        "weight_sample": [0.01 * i - 0.05 for i in range(16)],
    }
    return ModelFingerprint(**{**fields, **overrides})


def manifest_dict(**overrides) -> dict:
    fields = {
        "schema_version": 1,
        "id": "toy_deception",
        "version": "0.1.0",
        "kind": "logistic",
        "kind_config": {},
        "hook_point": "blocks.2.resid_post",
        "d_model": D,
        "aggregation": {"kind": "ema", "alpha": 0.3},
        "input_format": "chat",
        "threshold": 0.7,
        "calibration": {
            "method": "target_fpr",
            "target_fpr": 0.01,
            "benign_set": "alpaca_benign",
            "n_benign": 500,
            "achieved_fpr": 0.008,
        },
        "metrics": {"test": {"auroc": 0.97, "auprc": 0.95, "recall_at_1pct_fpr": 0.6}},
        "model": model_fp().model_dump(),
        "provenance": {"seed": 0, "git_commit": "deadbeef", "params": {"C": 1.0}},
    }
    return {**fields, **overrides}


@pytest.fixture(scope="module")
def probe() -> LogisticProbe:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = (rng.normal(size=(200, D)) + np.outer(y, np.ones(D))).astype(np.float32)
    probe = LogisticProbe()
    probe.fit(x, y)
    return probe


@pytest.fixture
def pack_dir(tmp_path, probe) -> Path:
    folder = tmp_path / "toy_deception"
    ProbePack(Manifest.model_validate(manifest_dict()), probe).save(folder)
    return folder


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def refused(folder: Path, phrase: str, expect: ModelFingerprint | None = None) -> str:
    with pytest.raises(PackError, match=phrase) as info:
        ProbePack.load(folder, expect=expect)
    message = str(info.value)
    assert str(folder) in message
    return message


def test_round_trip_scores_identically(pack_dir, probe):
    pack = ProbePack.load(pack_dir, expect=model_fp())
    x = torch.randn(8, D)
    torch.testing.assert_close(pack.head().logits(x), probe.head().logits(x), rtol=0, atol=0)
    assert pack.manifest.kind == "logistic" and pack.manifest.kind_config["C"] == 1.0
    assert len(pack.manifest.weights_sha256) == 64
    assert pack.manifest.layer == 2


def test_platt_scaling_is_folded_into_the_head_and_survives_a_round_trip(pack_dir, probe):
    edit_manifest(pack_dir, platt={"a": 0.25, "b": -1.5, "fitted_on": "held-out rows", "n": 40})
    pack = ProbePack.load(pack_dir, expect=model_fp())
    x = torch.randn(8, D)
    torch.testing.assert_close(pack.head().logits(x), 0.25 * probe.head().logits(x) - 1.5)
    assert pack.manifest.platt.fitted_on == "held-out rows"


@pytest.mark.parametrize("platt, phrase", [({"a": 0.0, "b": 0.0, "fitted_on": "x", "n": 9}, "platt.a"),
                                           ({"a": 1.0, "b": 0.0, "fitted_on": "x"}, "platt.n")])
def test_platt_scaling_must_keep_the_order_and_say_what_it_was_fitted_on(pack_dir, platt, phrase):
    edit_manifest(pack_dir, platt=platt)
    refused(pack_dir, phrase)


def test_manifest_is_readable_json(pack_dir):
    text = (pack_dir / "manifest.json").read_text()
    assert text.startswith("{\n  ") and json.loads(text)["id"] == "toy_deception"


def test_missing_folder(tmp_path):
    refused(tmp_path / "nowhere", "no manifest.json found")


def test_missing_weights(pack_dir):
    (pack_dir / "weights.safetensors").unlink()
    refused(pack_dir, "weights.safetensors is missing")


def test_bad_json(pack_dir):
    (pack_dir / "manifest.json").write_text("{not json")
    refused(pack_dir, "is not valid JSON")


def test_schema_errors_name_field_paths(pack_dir):
    edit_manifest(pack_dir, aggregation={"kind": "ema"}, hook_point="layer3", surprise=1)
    message = refused(pack_dir, "does not match the manifest schema")
    for path in ("aggregation", "hook_point", "surprise"):
        assert path in message


def test_unknown_kind_lists_known(pack_dir):
    edit_manifest(pack_dir, kind="svm")
    refused(pack_dir, r"unknown probe kind 'svm'; known kinds: diff_means, lat, logistic, mlp")


def test_bad_kind_config(pack_dir):
    edit_manifest(pack_dir, kind_config={"C": 1.0, "penalty": "l1"})
    refused(pack_dir, "kind_config is not valid for kind 'logistic'.*penalty")


def test_pickle_in_place_of_safetensors(pack_dir, probe):
    (pack_dir / "weights.safetensors").write_bytes(pickle.dumps(probe.tensors()))
    refused(pack_dir, "is a pickle or torch.save file.*never unpickles")


def test_torch_save_zip_in_place_of_safetensors(pack_dir, probe):
    torch.save(probe.tensors(), pack_dir / "weights.safetensors")
    refused(pack_dir, "is a pickle or torch.save file.*never unpickles")


def test_only_pickle_files_present(pack_dir, probe):
    (pack_dir / "weights.safetensors").unlink()
    torch.save(probe.tensors(), pack_dir / "probe.pt")
    refused(pack_dir, r"found probe.pt but no weights.safetensors.*never unpickles")


def test_truncated_weights(pack_dir):
    path = pack_dir / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    refused(pack_dir, "truncated or modified")


def test_unparseable_weights_with_matching_hash(pack_dir):
    import hashlib

    data = b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all"
    (pack_dir / "weights.safetensors").write_bytes(data)
    edit_manifest(pack_dir, weights_sha256=hashlib.sha256(data).hexdigest())
    refused(pack_dir, "truncated or modified: it does not parse")


def resave(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write new weights and a matching hash, as a careless exporter would."""
    import hashlib

    save_file(tensors, folder / "weights.safetensors")
    sha = hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()
    edit_manifest(folder, weights_sha256=sha)


def test_nan_tensor_is_named(pack_dir, probe):
    tensors = probe.tensors()
    tensors["coef"] = tensors["coef"].clone()
    tensors["coef"][3] = float("nan")
    resave(pack_dir, tensors)
    refused(pack_dir, "tensor 'coef' has non-finite values")


def test_save_refuses_nan(tmp_path, probe):
    bad = LogisticProbe.from_tensors(
        probe.config, {**probe.tensors(), "intercept": torch.tensor([float("inf")])}
    )
    with pytest.raises(PackError, match="tensor 'intercept' has non-finite values"):
        ProbePack(Manifest.model_validate(manifest_dict()), bad).save(tmp_path / "x")


def test_weights_disagree_with_manifest_d_model(pack_dir):
    edit_manifest(pack_dir, d_model=32, model=model_fp(d_model=32).model_dump())
    refused(pack_dir, "wrong shape: weights have d_model 16, manifest says 32")


def test_manifest_d_model_disagrees_with_fingerprint(pack_dir):
    edit_manifest(pack_dir, d_model=32)
    refused(pack_dir, "wrong shape: manifest d_model 32 disagrees with its model fingerprint")


def test_inconsistent_tensor_shapes(pack_dir, probe):
    resave(pack_dir, {**probe.tensors(), "std": torch.ones(D - 1)})
    refused(pack_dir, r"wrong shape: logistic probe: tensor 'std' has shape \(15,\)")


@pytest.mark.parametrize(
    ("other", "phrase"),
    [
        (model_fp(d_model=64), "d_model 16, this model has 64"),
        (model_fp(architecture="Qwen2ForCausalLM"), "architecture LlamaForCausalLM, this model"),
        (model_fp(tokenizer_sha256="cd" * 32), "tokenizer sha256 abababababab"),
        (model_fp(weight_sample=[1.0] * 16), "different weights of this arch"),
    ],
)
def test_wrong_model(pack_dir, other, phrase):
    refused(pack_dir, f"made for a different model: pack was made for {phrase}", expect=other)


def test_load_packs_refuses_duplicate_ids(pack_dir, tmp_path, probe):
    twin = tmp_path / "twin"
    ProbePack(Manifest.model_validate(manifest_dict()), probe).save(twin)
    with pytest.raises(PackError, match="duplicate pack id 'toy_deception'"):
        load_packs([pack_dir, twin])
    other = tmp_path / "other"
    ProbePack(Manifest.model_validate(manifest_dict(id="other")), probe).save(other)
    assert [p.manifest.id for p in load_packs([pack_dir, other])] == ["toy_deception", "other"]


@pytest.mark.parametrize(
    "agg",
    [
        {"kind": "ema"},
        {"kind": "ema", "alpha": 0.0},
        {"kind": "ema", "alpha": 1.5},
        {"kind": "mean", "alpha": 0.5},
        {"kind": "rolling_max"},
        {"kind": "rolling_max", "window": 0},
        {"kind": "max_rolling_mean"},
        {"kind": "max", "window": 4},
    ],
)
def test_aggregation_params_match_kind(agg):
    with pytest.raises(ValueError):
        Aggregation.model_validate(agg)


def test_valid_aggregations():
    assert Aggregation(kind="ema", alpha=1.0).alpha == 1.0
    assert Aggregation(kind="rolling_max", window=8).window == 8
    assert Aggregation(kind="max_rolling_mean", window=16).window == 16
    assert Aggregation(kind="last").alpha is None


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "Bad Id"},
        {"hook_point": "blocks.2.resid"},
        {"hook_point": "blocks.4.resid_pre"},  # past the last of 4 layers
        {"threshold": 1.2},
        {"schema_version": 2},
        {"input_format": "jsonl"},
    ],
)
def test_manifest_schema_rejects(changes):
    with pytest.raises(ValueError):
        Manifest.model_validate(manifest_dict(**changes))


def test_calibration_bounds():
    with pytest.raises(ValueError):
        Calibration(
            method="target_fpr", target_fpr=0.0, benign_set="b", n_benign=10, achieved_fpr=0
        )


def test_shipped_packs_dir():
    assert shipped_packs_dir() == Path(__file__).parents[2] / "probes" / "packs"


def test_packs_off_by_default_load_only_when_named(tmp_path, probe, monkeypatch):
    """A shipped pack below its quality target must not alert on every request of a plain `serve`."""
    monkeypatch.setattr("probes.pack.shipped_packs_dir", lambda: tmp_path)
    ProbePack(Manifest.model_validate(manifest_dict(id="on")), probe).save(tmp_path / "on")
    ProbePack(Manifest.model_validate(manifest_dict(id="off", enabled_by_default=False)), probe).save(tmp_path / "off")
    (tmp_path / "not_a_pack").mkdir()
    assert shipped_packs() == {"off": (tmp_path / "off", False), "on": (tmp_path / "on", True)}
    assert default_pack_dirs() == [tmp_path / "on"]
    assert default_pack_dirs(also={"off": None, "user_pack": None}) == [tmp_path / "off", tmp_path / "on"]


def test_manifests_without_the_flag_stay_enabled(pack_dir):
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    del manifest["enabled_by_default"]
    assert Manifest.model_validate(manifest).enabled_by_default


def test_fingerprint_mismatch_tolerates_bf16_rounding():
    base = model_fp()
    rounded = [torch.tensor(v).bfloat16().float().item() for v in base.weight_sample]
    assert base.mismatch(model_fp(weight_sample=rounded)) is None


def tiny_tokenizer(extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "hello", "world", "probe", *extra]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_fingerprint_of_a_tiny_llama():
    model, tok = tiny_llama(0), tiny_tokenizer()
    fp = fingerprint(model, tok)
    assert (fp.architecture, fp.model_type) == ("LlamaForCausalLM", "llama")
    assert (fp.num_layers, fp.d_model, fp.vocab_size) == (2, 32, 128)
    flat = model.get_input_embeddings().weight.detach().reshape(-1)
    assert fp.weight_sample[0] == flat[0].item() and fp.weight_sample[-1] == flat[-1].item()
    assert fingerprint(model, tiny_tokenizer()) == fp

    assert fp.mismatch(fingerprint(model.to(torch.bfloat16), tok)) is None
    assert "tokenizer" in fp.mismatch(fingerprint(model, tiny_tokenizer(extra=("new",))))
    assert "different weights" in fp.mismatch(fingerprint(tiny_llama(1), tok))


def test_zero_std_is_refused(pack_dir, probe):
    resave(pack_dir, {**probe.tensors(), "std": torch.zeros(D)})
    refused(pack_dir, r"folded scoring weights \(w1, b1\) overflow float32.*detector would be blind")


def test_coefficient_near_float32_limit_is_refused(pack_dir, probe):
    """Every stored tensor is finite, but scoring overflows: NaN/inf scores never flag correctly."""
    tensors = {**probe.tensors(), "mean": torch.zeros(D), "std": torch.ones(D), "coef": torch.full((D,), 3e38)}
    resave(pack_dir, tensors)
    refused(pack_dir, "scoring head gives NaN or inf on 64 of 65 check inputs")


def test_all_zero_weights_are_refused(pack_dir, probe):
    resave(pack_dir, {name: torch.zeros_like(t) for name, t in probe.tensors().items()} | {"std": torch.ones(D)})
    refused(pack_dir, r"same logit \(0\) for every check input")


def test_nan_producing_mlp_is_refused(tmp_path):
    """Huge hidden activations times output weights of both signs: inf - inf = NaN."""
    config, folder = MlpConfig(hidden=2), tmp_path / "mlp"
    healthy = {"mean": torch.zeros(D), "std": torch.ones(D), "w1": torch.randn(D, 2), "b1": torch.zeros(2),
               "w2": torch.tensor([1.0, -1.0]), "b2": torch.zeros(1)}
    manifest = Manifest.model_validate(manifest_dict(kind="mlp", kind_config=config.model_dump()))
    ProbePack(manifest, MlpProbe.from_tensors(config, healthy)).save(folder)
    resave(folder, {**healthy, "w1": torch.full((D, 2), 1e30), "w2": torch.tensor([1e30, -1e30])})
    with pytest.raises(PackError, match=f"{folder}: its scoring head gives NaN or inf"):
        load_packs([folder])


def test_save_refuses_a_blind_head(tmp_path, probe):
    blind = LogisticProbe.from_tensors(probe.config, {**probe.tensors(), "coef": torch.zeros(D)})
    with pytest.raises(PackError, match="same logit"):
        ProbePack(Manifest.model_validate(manifest_dict()), blind).save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_check_inputs_are_fixed_and_spread():
    x = check_inputs(D)
    assert torch.equal(x, check_inputs(D)) and x.dtype == torch.float32 and x.shape == (65, D)
    assert x[:-1].norm(dim=1).mean().item() == pytest.approx(100, rel=0.2) and not x[-1].any()


def test_head_problem_accepts_a_healthy_head(probe):
    assert head_problem(probe.head()) is None
    assert "same logit" in head_problem(ScoringHead(torch.full((D, 1), 1e-30), torch.ones(1)))


def test_shipped_packs_pass_the_health_check():
    packs = load_packs([folder for folder, _ in shipped_packs().values()])
    assert {p.manifest.id for p in packs} >= {"harmful_intent", "deception"}
    assert all(head_problem(p.head()) is None for p in packs)


def test_serving_imports_neither_sklearn_nor_matplotlib():
    """Training needs scikit-learn; loading a pack and building its head must not import it."""
    code = (
        "import sys; from probes.pack import ProbePack, shipped_packs; "
        "ProbePack.load(shipped_packs()['harmful_intent'][0]).head(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'matplotlib'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
