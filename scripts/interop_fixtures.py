#!/usr/bin/env python3
"""Write tiny SAE interop fixtures with the REAL peer libraries (SAELens, EleutherAI sparsify).

Run this inside the throwaway venv that scripts/make-interop-fixtures.sh builds; it is NOT
part of latentwatch and must never be imported by it (the peer libraries' pins clash with ours):

    bash scripts/make-interop-fixtures.sh            # builds the venv, then runs this file
    /tmp/lw-interop-venv/bin/python scripts/interop_fixtures.py --out tests/monitor/sae/fixtures

Every SAE is saved with its library's own save function, reloaded with the library's own
loader, and its expected outputs come from the library's own encode/decode on the reloaded
object. Gemma Scope has no writer library: its params.npz is written by hand following the
published layout, and its expected outputs come from the published JumpReLU formula.
Seeds are fixed, so a rerun with the same pinned versions rewrites the same tensors.
See tests/monitor/sae/fixtures/README.md for what each fixture is and the conventions.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

D_IN = 16
D_SAE = 64
BATCH = 8
MODEL_NAME = "latentwatch-fixture-model"  # recorded in SAELens metadata.model_name
SPARSIFY_MODEL = "HuggingFaceTB/SmolLM2-135M"  # recorded in sparsify's run-level config.json
OWNED_SUBDIRS = ("saelens", "sparsify", "gemma_scope", "bad")  # everything else in --out is left alone
MAX_FILE_BYTES = 100_000

torch.set_num_threads(1)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "sae-lens", "eai-sparsify", "transformer-lens", "transformers", "safetensors", "numpy"):
        out[dist] = md.version(dist)
    return out


VERSIONS: dict[str, str] = {}
MANIFEST: dict[str, dict] = {}
CROSS_CHECKS: dict[str, str] = {}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_x(seed: int, scale: float = 1.5) -> torch.Tensor:
    """A fixed [8, d_in] float32 batch with a non-zero per-dimension mean (so b_dec matters)."""
    g = gen(seed)
    offset = torch.randn(D_IN, generator=g)
    return (torch.randn(BATCH, D_IN, generator=g) * scale + offset).to(torch.float32)


def random_params(seed: int, *, dec_scale: float = 0.35) -> dict[str, torch.Tensor]:
    """Random SAELens-orientation weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in] (non-unit row norms)."""
    g = gen(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.3 - 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * dec_scale,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }


def frac_active(acts: torch.Tensor) -> float:
    return float((acts != 0).float().mean())


def write_expected(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # One metadata entry holding sorted JSON: safetensors writes a multi-key metadata map in
    # hash order, which would make reruns differ byte-wise.
    save_file(tensors, str(folder / "expected.safetensors"), metadata={"info": json.dumps(meta, sort_keys=True)})
    back = load_file(str(folder / "expected.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k


def record(name: str, folder: Path, out: Path, info: dict) -> None:
    info = dict(info)
    info["files"] = sorted(str(p.relative_to(out)) for p in folder.rglob("*") if p.is_file())
    MANIFEST[name] = info
    print(f"  {name}: {info['files']}  active={info.get('frac_active')}")


# ---------------------------------------------------------------------------------------------
# SAELens
# ---------------------------------------------------------------------------------------------


def saelens_fixtures(out: Path) -> None:
    from sae_lens import (
        SAE,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    base = out / "saelens"
    ver = VERSIONS["sae-lens"]

    def meta(hook: str) -> SAEMetadata:
        return SAEMetadata(
            hook_name=hook, model_name=MODEL_NAME, hook_head_index=None, prepend_bos=True, context_size=128
        )

    def load_params(sae, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in params.items():
                getattr(sae, key).data.copy_(value.to(getattr(sae, key).dtype))

    def finish(name: str, sae, folder: Path, x: torch.Tensor, info: dict, *, save: str = "save_model") -> None:
        """Save with the library, reload with SAE.load_from_disk, run the reloaded SAE's encode/decode."""
        if save == "save_model":
            sae.save_model(folder)
        else:
            sae.save_inference_model(folder)
        loaded = SAE.load_from_disk(folder)
        loaded.eval()
        with torch.no_grad():
            acts = loaded.encode(x)
            recon = loaded.decode(acts)
            if save == "save_model":  # the in-memory object must agree with what came back from disk
                mem_acts = sae.encode(x)
                mem_recon = sae.decode(mem_acts)
                assert torch.equal(mem_acts, acts) and torch.equal(mem_recon, recon), name
        assert acts.shape == (BATCH, D_SAE) and not acts.is_sparse
        write_expected(
            folder,
            {"x": x, "acts": acts, "recon": recon},
            {
                "library": "sae-lens",
                "library_version": ver,
                "writer": f"{type(sae).__name__}.{save}",
                "reader": "sae_lens.SAE.load_from_disk",
                "acts": "SAE.encode(x) of the reloaded SAE (dense)",
                "recon": "SAE.decode(SAE.encode(x)) of the reloaded SAE",
                "loaded_class": type(loaded).__name__,
            },
        )
        info.update(
            library="sae-lens",
            library_version=ver,
            loaded_class=type(loaded).__name__,
            dtype=str(loaded.dtype).replace("torch.", ""),
            frac_active=round(frac_active(acts), 3),
        )
        record(name, folder, out, info)

    # 1-5. standard (ReLU): b_dec subtracted from the input or not, run-time normalisation, bf16 storage
    standard = [  # folder, hook, seed offset, input scale, config beyond SAELens' defaults
        ("standard", "blocks.6.hook_resid_pre", 1, 1.5, {"apply_b_dec_to_input": False}),
        ("standard_b_dec_in", "blocks.3.hook_resid_post", 2, 1.5, {"apply_b_dec_to_input": True}),
        ("standard_constant_norm_rescale", "blocks.4.hook_resid_post", 3, 6.0,
         {"apply_b_dec_to_input": True, "normalize_activations": "constant_norm_rescale"}),
        ("standard_layer_norm", "blocks.5.hook_resid_pre", 4, 4.0,
         {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
        ("standard_bfloat16", "blocks.1.hook_resid_post", 5, 1.5, {"apply_b_dec_to_input": True, "dtype": "bfloat16"}),
    ]
    for folder, hook, i, scale, extra in standard:
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta(hook), **extra))
        load_params(sae, random_params(100 + i))
        info = {"architecture": "standard", "apply_b_dec_to_input": extra["apply_b_dec_to_input"],
                "normalize_activations": extra.get("normalize_activations", "none"),
                **({"dtype": extra["dtype"]} if "dtype" in extra else {}), "hook_name": hook}
        finish(f"saelens/{folder}", sae, base / folder, make_x(1000 + i, scale=scale), info)

    # 6. jumprelu, mlp_out hook, positive random per-latent thresholds (stored raw, not log)
    name = "saelens/jumprelu"
    cfg = JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, metadata=meta("blocks.2.hook_mlp_out"))
    sae = JumpReLUSAE(cfg)
    params = random_params(106)
    params["threshold"] = torch.rand(D_SAE, generator=gen(1106)) * 1.2 + 0.1
    load_params(sae, params)
    finish(
        name,
        sae,
        base / "jumprelu",
        make_x(1006),
        {
            "architecture": "jumprelu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "hook_name": "blocks.2.hook_mlp_out",
        },
    )

    # 7. topk (k=8), apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=False
    name = "saelens/topk"
    cfg = TopKSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=8, apply_b_dec_to_input=True, metadata=meta("blocks.6.hook_resid_post")
    )
    sae = TopKSAE(cfg)
    load_params(sae, random_params(107))
    finish(
        name,
        sae,
        base / "topk",
        make_x(1007),
        {
            "architecture": "topk",
            "k": 8,
            "apply_b_dec_to_input": True,
            "rescale_acts_by_decoder_norm": False,
            "normalize_activations": "none",
            "hook_name": "blocks.6.hook_resid_post",
        },
    )

    # 8. topk (k=6) with rescale_acts_by_decoder_norm=True and NON-unit decoder rows
    name = "saelens/topk_rescale_acts_by_decoder_norm"
    cfg = TopKSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=6,
        rescale_acts_by_decoder_norm=True,
        apply_b_dec_to_input=False,
        metadata=meta("blocks.3.hook_mlp_out"),
    )
    sae = TopKSAE(cfg)
    params = random_params(108)
    params["W_dec"] = params["W_dec"] * (
        torch.rand(D_SAE, 1, generator=gen(1108)) * 2.5 + 0.25
    )  # row norms spread ~0.3..3
    load_params(sae, params)
    finish(
        name,
        sae,
        base / "topk_rescale_acts_by_decoder_norm",
        make_x(1008),
        {
            "architecture": "topk",
            "k": 6,
            "apply_b_dec_to_input": False,
            "rescale_acts_by_decoder_norm": True,
            "normalize_activations": "none",
            "hook_name": "blocks.3.hook_mlp_out",
        },
    )

    # 9. batchtopk: a training-only architecture; save_inference_model writes it as "jumprelu"
    name = "saelens/batchtopk"
    tcfg = BatchTopKTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=8,
        topk_threshold_lr=1.0,
        apply_b_dec_to_input=True,
        metadata=meta("blocks.6.hook_resid_pre"),
    )
    tsae = BatchTopKTrainingSAE(tcfg)
    params = random_params(109)
    params["W_dec"] = params["W_dec"] * (torch.rand(D_SAE, 1, generator=gen(1109)) * 2.0 + 0.5)
    load_params(tsae, params)
    x = make_x(1009)
    with torch.no_grad():
        # One threshold update with lr=1.0 (the library's own rule): topk_threshold = min positive
        # batch-top-k activation on a separate calibration batch.
        tsae.update_topk_threshold(tsae.encode(make_x(2009, scale=1.5)))
    finish(
        name,
        tsae,
        base / "batchtopk",
        x,
        {
            "architecture": "jumprelu (trained as batchtopk)",
            "k": 8,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "hook_name": "blocks.6.hook_resid_pre",
            "topk_threshold": float(tsae.topk_threshold),
        },
        save="save_inference_model",
    )


# ---------------------------------------------------------------------------------------------
# EleutherAI sparsify
# ---------------------------------------------------------------------------------------------


def sparsify_fixtures(out: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig  # the CLI's config; Trainer saves it as <run>/config.json

    ver = VERSIONS["eai-sparsify"]
    specs = [
        # run folder, hookpoint, SparseCoderConfig kwargs, seed
        ("tiny-resid", "layers.6", {"expansion_factor": 4, "num_latents": 0, "k": 8}, 201),
        (
            "tiny-mlp",
            "layers.3.mlp",
            {"num_latents": D_SAE, "k": 6},
            202,
        ),  # expansion_factor left at 32: num_latents wins
    ]
    for run, hookpoint, kwargs, seed in specs:
        run_dir = out / "sparsify" / run
        sae_cfg = SparseCoderConfig(**kwargs)
        torch.manual_seed(seed)
        sae = SparseCoder(D_IN, sae_cfg, device="cpu", dtype=torch.float32)
        assert sae.num_latents == D_SAE
        g = gen(seed)
        with torch.no_grad():
            sae.encoder.weight.copy_(
                torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN)
            )  # nn.Linear: [d_sae, d_in]
            sae.encoder.bias.copy_(torch.randn(D_SAE, generator=g) * 0.3 - 0.1)
            sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g))
            sae.set_decoder_norm_to_unit_norm()  # what the trainer does every step when normalize_decoder=True
            sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
        folder = run_dir / hookpoint
        sae.save_to_disk(folder)  # exactly what Trainer._checkpoint calls: sae.save_to_disk(f"{path}/{name}")
        RunConfig(
            sae=sae_cfg,
            model=SPARSIFY_MODEL,
            dataset="EleutherAI/SmolLM2-135M-10B",
            hookpoints=[hookpoint],
            run_name=run,
            save_dir="checkpoints",  # the CLI default; only recorded, nothing is written there
            log_to_wandb=False,
            data_preprocessing_num_proc=1,  # default is cpu_count() // 2, which would vary by machine
        ).save_json(str(run_dir / "config.json"))

        loaded = SparseCoder.load_from_disk(folder)
        x = make_x(3000 + seed)
        with torch.no_grad():
            enc = loaded.encode(x)
            recon = loaded.decode(enc.top_acts, enc.top_indices)
            mem = sae.encode(x)
            assert torch.equal(mem.top_acts, enc.top_acts) and torch.equal(mem.top_indices, enc.top_indices)
            # densify the library's (top_acts, top_indices) output: a layout change, not a recomputation
            acts = torch.zeros(BATCH, loaded.num_latents, dtype=enc.top_acts.dtype).scatter_(
                -1, enc.top_indices, enc.top_acts
            )
            fwd = loaded(x)  # forward() = decode(encode(x)) (+ losses); must agree
            assert torch.allclose(fwd.sae_out, recon, atol=1e-6)
        write_expected(
            folder,
            {
                "x": x,
                "acts": acts,
                "recon": recon,
                "top_acts": enc.top_acts,
                "top_indices": enc.top_indices.to(torch.int64),
                "pre_acts": enc.pre_acts,
            },
            {
                "library": "eai-sparsify",
                "library_version": ver,
                "writer": "sparsify.SparseCoder.save_to_disk",
                "reader": "sparsify.SparseCoder.load_from_disk",
                "acts": "dense scatter of SparseCoder.encode(x).top_acts at .top_indices",
                "recon": "SparseCoder.decode(top_acts, top_indices)",
                "top_indices_order": "torch.topk(sorted=False): order is not meaningful",
            },
        )
        info = {
            "library": "eai-sparsify",
            "library_version": ver,
            "hookpoint": hookpoint,
            "k": sae_cfg.k,
            "num_latents_in_cfg": sae_cfg.num_latents,
            "expansion_factor_in_cfg": sae_cfg.expansion_factor,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "frac_active": round(frac_active(acts), 3),
        }
        record(f"sparsify/{run}/{hookpoint}", run_dir, out, info)

    # Cross-check (informational): SAELens ships a converter for sparsify folders. Record whether
    # it reproduces sparsify's own outputs on these fixtures.
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    for run, hookpoint, _, _ in specs:
        folder = out / "sparsify" / run / hookpoint
        key = f"sae_lens SAE.load_from_disk(converter=sparsify_disk_loader) on sparsify/{run}/{hookpoint}"
        try:
            exp = load_file(str(folder / "expected.safetensors"))
            conv = SAE.load_from_disk(folder, converter=sparsify_disk_loader)
            with torch.no_grad():
                acts = conv.encode(exp["x"]).float()
                recon = conv.decode(conv.encode(exp["x"])).float()
            d_acts = float((acts - exp["acts"]).abs().max())
            d_recon = float((recon - exp["recon"]).abs().max())
            CROSS_CHECKS[key] = (
                f"loaded as {type(conv).__name__} dtype={conv.cfg.dtype} "
                f"apply_b_dec_to_input={conv.cfg.apply_b_dec_to_input} hook_name={conv.cfg.metadata.hook_name}; "
                f"max|acts-expected|={d_acts:.3g}, max|recon-expected|={d_recon:.3g}"
            )
        except Exception as exc:  # noqa: BLE001 - informational only
            CROSS_CHECKS[key] = f"FAILS: {type(exc).__name__}: {' '.join(str(exc).split())}"


# ---------------------------------------------------------------------------------------------
# Gemma Scope (no writer library; published layout, formula computed here)
# ---------------------------------------------------------------------------------------------


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's format (a zip of .npy members named KEY.npy), but with fixed member timestamps so
    reruns are byte-identical (np.savez stamps each member with the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)


def gemma_scope_fixture(out: Path) -> None:
    folder = out / "gemma_scope" / "layer_6" / "width_16k" / "average_l0_12"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(301)
    params = {
        "W_enc": (rng.standard_normal((D_IN, D_SAE)) / math.sqrt(D_IN)).astype(np.float32),
        "W_dec": (rng.standard_normal((D_SAE, D_IN)) * 0.35).astype(np.float32),
        "b_enc": (rng.standard_normal(D_SAE) * 0.3 - 0.1).astype(np.float32),
        "b_dec": (rng.standard_normal(D_IN) * 0.5).astype(np.float32),
        "threshold": (rng.random(D_SAE) * 1.2 + 0.1).astype(np.float32),
    }
    write_npz(folder / "params.npz", params)
    with np.load(folder / "params.npz") as data:
        p = {k: data[k] for k in data.files}
    x = make_x(1301).numpy()
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre * (pre > p["threshold"])).astype(np.float32)
    recon = (acts @ p["W_dec"] + p["b_dec"]).astype(np.float32)
    write_expected(
        folder,
        {"x": torch.from_numpy(x), "acts": torch.from_numpy(acts), "recon": torch.from_numpy(recon)},
        {
            "library": "none (numpy reference formula)",
            "numpy_version": VERSIONS["numpy"],
            "acts": "pre = x @ W_enc + b_enc; acts = pre * (pre > threshold)",
            "recon": "acts @ W_dec + b_dec",
        },
    )
    # Cross-check (informational): SAELens's Gemma Scope path builds a JumpReLUSAE with
    # apply_b_dec_to_input=False from these same arrays; its encode is relu(pre) * (pre > threshold).
    try:
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
        sae.load_state_dict({k: torch.from_numpy(v) for k, v in p.items()})
        with torch.no_grad():
            a = sae.encode(torch.from_numpy(x))
            r = sae.decode(a)
        CROSS_CHECKS["sae_lens JumpReLUSAE on gemma_scope params"] = (
            f"max|acts-expected|={float((a - torch.from_numpy(acts)).abs().max()):.3g}, "
            f"max|recon-expected|={float((r - torch.from_numpy(recon)).abs().max()):.3g}"
        )
    except Exception as exc:  # noqa: BLE001 - informational only
        CROSS_CHECKS["sae_lens JumpReLUSAE on gemma_scope params"] = f"FAILS: {type(exc).__name__}: {exc}"
    record(
        "gemma_scope/layer_6/width_16k/average_l0_12",
        folder,
        out,
        {
            "library": "none (published Gemma Scope layout)",
            "dtype": "float32",
            "frac_active": round(float((acts != 0).mean()), 3),
        },
    )


# ---------------------------------------------------------------------------------------------
# Deliberately bad fixture
# ---------------------------------------------------------------------------------------------


def bad_fixture(out: Path) -> None:
    folder = out / "bad"
    folder.mkdir(parents=True, exist_ok=True)
    g = gen(401)
    state = {  # a benign but pickled state dict: loaders must refuse pickle, never unpickle it
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_enc": torch.zeros(D_SAE),
        "b_dec": torch.zeros(D_IN),
    }
    torch.save(state, folder / "sae_weights.pt")
    record("bad", folder, out, {"library": "torch.save (pickle)", "purpose": "error tests: pickle must be rejected"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="fixture root, e.g. tests/monitor/sae/fixtures")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    VERSIONS.update(versions())
    print("versions:", VERSIONS)
    for sub in OWNED_SUBDIRS:  # idempotent: regenerate only what this script owns
        shutil.rmtree(out / sub, ignore_errors=True)

    saelens_fixtures(out)
    sparsify_fixtures(out)
    gemma_scope_fixture(out)
    bad_fixture(out)

    files = {}
    for sub in OWNED_SUBDIRS:
        for p in sorted((out / sub).rglob("*")):
            if p.is_file():
                size = p.stat().st_size
                assert size < MAX_FILE_BYTES, f"{p} is {size} bytes"
                files[str(p.relative_to(out))] = {"bytes": size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    manifest = {
        "generator": "scripts/interop_fixtures.py (run by scripts/make-interop-fixtures.sh)",
        "versions": VERSIONS,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "batch": BATCH,
        "fixtures": MANIFEST,
        "cross_checks": CROSS_CHECKS,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print("cross checks:")
    for k, v in CROSS_CHECKS.items():
        print(f"  {k}: {v}")
    print(f"wrote {len(files)} files under {out}")


if __name__ == "__main__":
    main()
