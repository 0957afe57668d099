"""Steering-vector packs: round trip, every refusal names its file, repeng's GGUF layout proven against a
fixture written by repeng itself, and a pack's Steering applied through monitor.steering."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import pickle
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monitor.domain import HookPoint
from monitor.runner import Encoded, HookPass
from monitor.steering import SteeringPlan
from probes.vectors import (
    MANIFEST,
    VECTORS,
    VectorPack,
    VectorPackError,
    export_repeng_gguf,
    import_repeng_gguf,
    load_vector_pack,
    open_vector_pack,
    resolve_vector,
    save_vector_pack,
    shipped_vectors,
)
from tests.tiny import tiny_runner

REPENG = Path(__file__).parent / "fixtures" / "repeng"
P1, P2 = HookPoint.parse("blocks.1.resid_post"), HookPoint.parse("blocks.2.resid_post")


@pytest.fixture(scope="module")
def runner(tiny_llama):
    return tiny_llama


def make_pack(runner, pack_id="toy", points=(P2, P1), **kw) -> VectorPack:
    gen = torch.Generator().manual_seed(0)
    directions = {p: torch.randn(runner.d_model, generator=gen) for p in points}
    return VectorPack.create(
        pack_id,
        directions,
        method="diff_means",
        model=runner.fingerprint,
        model_hint="llama",
        default_coefficient=2.0,
        **kw,
    )


@pytest.fixture()
def saved(runner, tmp_path) -> Path:
    save_vector_pack(make_pack(runner), tmp_path / "toy")
    return tmp_path / "toy"


def rewrite(folder: Path, tensors: dict[str, torch.Tensor], **manifest) -> None:
    """Replace the vectors (and manifest fields), keeping the sha pin right, so only the problem is left."""
    save_file(tensors, folder / VECTORS)
    m = json.loads((folder / MANIFEST).read_text())
    m.update(vectors_sha256=hashlib.sha256((folder / VECTORS).read_bytes()).hexdigest(), **manifest)
    (folder / MANIFEST).write_text(json.dumps(m))


# ---------------------------------------------------------------------------------- round trip


def test_round_trip_keeps_vectors_order_and_provenance(runner, saved):
    made = make_pack(runner)
    pack = load_vector_pack(saved, expect=runner.fingerprint)
    assert list(pack.directions) == [P2, P1]  # the manifest's order, not sorted
    for p in made.directions:
        assert torch.equal(pack.directions[p], made.directions[p])
        assert pack.directions[p].dtype == torch.float32
    m = pack.manifest
    assert m.id == "toy" and m.method == "diff_means" and m.default_coefficient == 2.0 and m.kind == "add"
    assert m.model == runner.fingerprint and m.d_model == runner.d_model
    assert [h.norm for h in m.hook_points] == pytest.approx([float(v.norm()) for v in made.directions.values()])
    assert len(m.vectors_sha256) == 64 and m.provenance.created_at
    assert pack.source == saved
    assert open_vector_pack("toy", base=saved.parent).directions.keys() == pack.directions.keys()


def test_steering_objects_scale_the_stored_vector(runner, saved):
    pack = load_vector_pack(saved)
    add = pack.steering()
    assert [s.id for s in add] == ["toy@blocks.2.resid_post", "toy@blocks.1.resid_post"]
    assert [s.hook_point for s in add] == [P2, P1] and {s.kind for s in add} == {"add"}
    assert {s.positions for s in add} == {"generated"}
    for s in add:  # the default coefficient (2) times the vector's norm: h += 2 * v
        assert s.coefficient == pytest.approx(2.0 * float(pack.directions[s.hook_point].norm()))
    (ablate,) = pack.steering(kind="ablate", hook_points=["blocks.1.resid_post"], positions="all")
    assert ablate.kind == "ablate" and ablate.coefficient == 1.0 and ablate.positions == "all"
    with pytest.raises(VectorPackError, match=r"no vector at blocks\.0\.resid_post.*blocks\.2\.resid_post"):
        pack.steering(hook_points=["blocks.0.resid_post"])


def test_a_pack_steers_the_tiny_model_through_monitor_steering(runner, saved):
    pack = load_vector_pack(saved, expect=runner.fingerprint)
    prompt = runner.encode(text="hello there", chat=True)

    def logits(steering):
        plan = SteeringPlan(1, runner.device, runner.dtype)
        for s in steering:
            plan.add(0, s)
        with runner.attached(plan.hook_points):
            runner.hook_pass = HookPass(plan=plan, phase="prompt")
            return runner.forward(runner.batch([prompt]))

    plain = logits([])
    assert torch.equal(logits(pack.steering(positions="generated")), plain)  # a prefill is not a generated token
    steered = logits(pack.steering(positions="all"))
    assert not torch.allclose(steered, plain)
    assert torch.allclose(logits(pack.steering(0.0, positions="all")), plain)


# ------------------------------------------------------------------------------- refusals


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(VectorPackError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_missing_folder_and_gguf_given_as_a_pack(tmp_path):
    assert error(load_vector_pack, tmp_path / "nope").startswith(f"{tmp_path / 'nope'}: no such folder")
    msg = error(load_vector_pack, REPENG / "tiny_llama.gguf")
    assert "tiny_llama.gguf: is a GGUF control vector" in msg and "latentwatch steer import" in msg


def test_missing_manifest_names_it(saved):
    (saved / MANIFEST).unlink()
    assert error(load_vector_pack, saved).startswith(f"{saved / MANIFEST}: missing")


@pytest.mark.parametrize(
    "text, problem", [("{not json", "not valid JSON"), ('{"id": "Bad Id"}', "does not match the manifest schema")]
)
def test_bad_manifest_names_it_and_the_field(saved, text, problem):
    (saved / MANIFEST).write_text(text)
    msg = error(load_vector_pack, saved)
    assert msg.startswith(f"{saved / MANIFEST}: {problem}")
    if "schema" in problem:
        assert "id:" in msg and "method:" in msg


def test_missing_vectors_names_the_file_and_refuses_pickles(saved):
    (saved / VECTORS).unlink()
    assert error(load_vector_pack, saved).startswith(f"{saved / VECTORS}: missing")
    (saved / "vectors.pt").write_bytes(pickle.dumps({"blocks.1.resid_post": [0.0]}))
    msg = error(load_vector_pack, saved)
    assert msg.startswith(f"{saved / VECTORS}: missing, but the folder holds vectors.pt") and "never unpickles" in msg


def test_pickled_vectors_are_refused_unread(saved):
    (saved / VECTORS).write_bytes(pickle.dumps({"blocks.1.resid_post": [0.0]}, protocol=4))
    assert error(load_vector_pack, saved).startswith(f"{saved / VECTORS}: is a pickle")


def test_modified_vectors_fail_the_sha_pin(saved):
    data = bytearray((saved / VECTORS).read_bytes())
    data[-1] ^= 0xFF
    (saved / VECTORS).write_bytes(bytes(data))
    assert error(load_vector_pack, saved).startswith(f"{saved / VECTORS}: truncated or modified")


def test_wrong_d_model_names_the_vector(saved, runner):
    rewrite(saved, {"blocks.1.resid_post": torch.zeros(16), "blocks.2.resid_post": torch.zeros(runner.d_model)})
    msg = error(load_vector_pack, saved)
    assert msg.startswith(f"{saved / VECTORS}: vector blocks.1.resid_post is float32 [16], not float32 [32]")


def test_non_finite_values_are_refused_on_save_and_load(saved, runner, tmp_path):
    bad = torch.zeros(runner.d_model)
    bad[3] = float("nan")
    rewrite(saved, {"blocks.1.resid_post": bad, "blocks.2.resid_post": torch.zeros(runner.d_model)})
    assert "vector blocks.1.resid_post has non-finite values" in error(load_vector_pack, saved)
    pack = make_pack(runner)
    pack.directions[P1][0] = float("inf")
    msg = error(save_vector_pack, pack, tmp_path / "out")
    assert msg.startswith(f"{tmp_path / 'out' / VECTORS}: vector blocks.1.resid_post has non-finite")
    assert not (tmp_path / "out").exists()


def test_unknown_hook_points_are_named(saved, runner):
    rewrite(
        saved,
        {
            "blocks.1.resid_post": torch.zeros(runner.d_model),
            "blocks.2.resid_post": torch.zeros(32),
            "blocks.0.mlp_out": torch.zeros(runner.d_model),
        },
    )
    msg = error(load_vector_pack, saved)
    assert msg.startswith(
        f"{saved / VECTORS}: tensors for hook points the manifest does not list: ['blocks.0.mlp_out']"
    )
    rewrite(
        saved,
        {
            "blocks.1.resid_post": torch.zeros(32),
            "blocks.2.resid_post": torch.zeros(32),
            "blocks.1.nowhere": torch.zeros(32),
        },
    )
    assert "unknown hook point 'blocks.1.nowhere'" in error(load_vector_pack, saved)


def test_fingerprint_mismatch_names_the_manifest(saved):
    other = tiny_runner("llama", seed=1).fingerprint  # same shape, other weights
    msg = error(load_vector_pack, saved, expect=other)
    assert msg.startswith(f"{saved / MANIFEST}: made for a different model: vector was made for different weights")


def test_imported_pack_without_fingerprint_checks_d_model_type_and_layers(runner, tmp_path):
    pack = save_vector_pack(import_repeng_gguf(REPENG / "tiny_llama.gguf"), tmp_path / "imported")
    assert pack.manifest.model is None and load_vector_pack(pack.source, expect=runner.fingerprint)
    wide = runner.fingerprint.model_copy(update={"d_model": 64})
    assert "vectors have d_model 32, this model's is 64" in error(load_vector_pack, pack.source, expect=wide)
    qwen = runner.fingerprint.model_copy(update={"model_type": "qwen2"})
    assert "made for model type 'llama', this model is 'qwen2'" in error(load_vector_pack, pack.source, expect=qwen)
    short = runner.fingerprint.model_copy(update={"num_layers": 2})
    assert "unknown hook point blocks.2.resid_post: this model has blocks 0..1" in error(
        load_vector_pack, pack.source, expect=short
    )


def test_resolve_names_what_was_looked_for(tmp_path):
    msg = error(resolve_vector, "no-such-vector", base=tmp_path)
    assert msg.startswith("no-such-vector: no such file or folder (nor under") and "shipped:" in msg
    assert "refusal" in shipped_vectors()
    assert resolve_vector("refusal").name == "refusal"


# ------------------------------------------------------------------------------------ repeng


def recorded() -> dict:
    return json.loads((REPENG / "tiny_llama.json").read_text())


def test_repeng_fixture_imports_to_the_recorded_directions():
    rec = recorded()
    pack = import_repeng_gguf(REPENG / "tiny_llama.gguf")
    assert [p.layer for p in pack.directions] == rec["layer_order"] == [2, 1]
    assert {p.site for p in pack.directions} == {"resid_post"}
    for p, v in pack.directions.items():
        assert torch.equal(v, torch.tensor(rec["directions"][str(p.layer)], dtype=torch.float32))
    m = pack.manifest
    assert m.method == "repeng" and m.model_hint == rec["model_type"] == "llama" and m.model is None
    assert m.provenance.data[0].sha256 == rec["sha256"] and m.id == "tiny_llama"
    assert rec["roundtrip"]["repeng_equal"] and rec["roundtrip"]["byte_identical"]  # repeng read our export


def test_our_export_of_the_fixture_is_what_repeng_wrote(tmp_path):
    """Byte for byte when our gguf is the version repeng wrote with: the writer makes the same calls in the
    same order (tensors in the file's order, which the pack keeps). Another gguf version may lay out the
    header differently, so then only the values are compared."""
    pack = import_repeng_gguf(REPENG / "tiny_llama.gguf")
    ours = export_repeng_gguf(save_vector_pack(pack, tmp_path / "p"), tmp_path / "ours.gguf")
    theirs = REPENG / "tiny_llama.gguf"
    if md.version("gguf") == recorded()["versions"]["gguf"]:
        assert ours.read_bytes() == theirs.read_bytes()
    back = import_repeng_gguf(ours)
    assert list(back.directions) == list(pack.directions)
    assert all(torch.equal(back.directions[p], v) for p, v in pack.directions.items())


def test_export_follows_llama_cpps_loader_rules(runner, tmp_path):
    """What common_control_vector_load_one accepts: only direction.<k> tensors, k >= 1, 1-D F32, one length."""
    path = export_repeng_gguf(make_pack(runner, points=(P1, P2)), tmp_path / "v.gguf")
    reader = gguf.GGUFReader(path)
    names = [t.name for t in reader.tensors]
    assert names == ["direction.1", "direction.2"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in reader.tensors)
    assert {int(t.n_elements) for t in reader.tensors} == {runner.d_model}
    assert bytes(reader.get_field("general.architecture").parts[-1]) == b"controlvector"


def test_repeng_control_is_our_add_at_resid_post(runner):
    """repeng's ControlModel, run by the fixture script, moved these logits; our Steering at
    blocks.<i>.resid_post with the same coefficient lands on the same numbers."""
    rec = recorded()["control"]
    ids = rec["input_ids"]
    prompt = Encoded(ids, [(0, 0)] * len(ids), "", 0)
    pack = import_repeng_gguf(REPENG / "tiny_llama.gguf")

    def logits(steering):
        plan = SteeringPlan(1, runner.device, runner.dtype)
        for s in steering:
            plan.add(0, s)
        with runner.attached(plan.hook_points):
            runner.hook_pass = HookPass(plan=plan, phase="prompt")
            return runner.forward(runner.batch([prompt]))[0, : rec["logits_kept"]]

    assert torch.allclose(logits([]), torch.tensor(rec["last_logits_plain"]), atol=1e-5), "not the fixture's model"
    steered = logits(pack.steering(rec["coefficient"], positions="all"))
    assert torch.allclose(steered, torch.tensor(rec["last_logits_controlled"]), atol=1e-4)


def write_gguf(path: Path, arch="controlvector", hint="llama", tensors=None) -> Path:
    w = gguf.GGUFWriter(path, arch)
    if hint:
        w.add_string(f"{arch}.model_hint", hint)
    for name, a in (tensors if tensors is not None else {"direction.1": np.ones(4, np.float32)}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"arch": "llama"}, "is a GGUF file of architecture 'llama', not a control vector"),
        ({"hint": ""}, "has no controlvector.model_hint"),
        ({"tensors": {}}, "holds no direction tensors"),
        ({"tensors": {"token_embd.weight": np.ones(4, np.float32)}}, "unknown tensor 'token_embd.weight'"),
        ({"tensors": {"direction.1": np.ones((2, 4), np.float32)}}, "tensor direction.1 is F32 [4, 2]"),
        (
            {"tensors": {"direction.1": np.ones(4, np.float32), "direction.2": np.ones(5, np.float32)}},
            "directions of different lengths [4, 5]",
        ),
        (
            {"tensors": {"direction.1": np.array([1, np.nan, 0, 0], np.float32)}},
            "vector blocks.1.resid_post has non-finite",
        ),
    ],
)
def test_import_refusals_name_the_file(tmp_path, kwargs, problem):
    path = write_gguf(tmp_path / "v.gguf", **kwargs)
    msg = error(import_repeng_gguf, path)
    assert msg.startswith(f"{path}: ") and problem in msg


def test_import_of_a_non_gguf_or_for_another_model(tmp_path, runner):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    assert error(import_repeng_gguf, junk).startswith(f"{junk}: does not parse as GGUF")
    assert error(import_repeng_gguf, tmp_path / "none.gguf").startswith(f"{tmp_path / 'none.gguf'}: no such file")
    path = write_gguf(tmp_path / "v.gguf")
    assert "made for a llama model with d_model 4, this model is a llama with d_model 32" in error(
        import_repeng_gguf, path, model=runner.fingerprint
    )
    pack = import_repeng_gguf(REPENG / "tiny_llama.gguf", model=runner.fingerprint)
    assert pack.manifest.model == runner.fingerprint


def test_export_refuses_what_repeng_cannot_hold(runner, tmp_path):
    pack = make_pack(runner, points=(HookPoint.parse("blocks.1.mlp_out"),))
    assert "steers blocks.1.mlp_out; a repeng layer is a block's output" in error(
        export_repeng_gguf, pack, tmp_path / "v.gguf"
    )
    assert not (tmp_path / "v.gguf").exists()
