"""How packs and the `saes` setting name SAEs: folders relative to the pack, shipped ids, pinned files, one copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monitor.sae import SAEError, store
from monitor.sae.store import files_sha256, open_sae, resolve

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture()
def sae_dir(tmp_path):
    src = next(p for p in sorted((FIXTURES / "saelens").iterdir()) if (p / "cfg.json").is_file())
    return shutil.copytree(src, tmp_path / "packs" / "saes" / "mine")


def test_a_folder_relative_to_the_pack_then_a_shipped_id(sae_dir, tmp_path, monkeypatch):
    assert resolve("saes/mine", base=tmp_path / "packs") == sae_dir
    monkeypatch.setattr(store, "shipped_saes_dir", lambda: tmp_path / "packs" / "saes")
    assert resolve("mine") == sae_dir


def test_unknown_references_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "shipped_saes_dir", lambda: tmp_path)
    (tmp_path / "one").mkdir()
    with pytest.raises(SAEError, match=r"^nope: no such file or folder \(nor under .*\), and no shipped SAE has that "
                                       r"id \(shipped: one\)$"):
        resolve("nope", base=tmp_path / "pack")
    with pytest.raises(SAEError, match=r"/nowhere: no such file or folder$"):
        resolve(tmp_path / "nowhere")


def test_one_copy_per_sae_and_its_id_is_the_folder_name(sae_dir):
    a, b = open_sae(sae_dir), open_sae(str(sae_dir))
    assert a is b and a.id == "mine"


def test_pinned_files_refuse_another_sae(sae_dir):
    digest = files_sha256(sae_dir)
    assert open_sae(sae_dir, sha256=digest).id == "mine"
    with pytest.raises(SAEError, match="are not the ones the pack was made with"):
        open_sae(sae_dir, sha256="0" * 64)


def test_wrong_width_is_refused(sae_dir):
    with pytest.raises(SAEError, match="but the model's d_model is 7"):
        open_sae(sae_dir, d_model=7)
