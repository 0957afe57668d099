#!/usr/bin/env python3
"""Write and check the repeng control-vector fixture with the REAL repeng library.

Runs inside the throwaway venv that scripts/make-repeng-fixtures.sh builds; it is NOT part of
latentwatch and never imports it (repeng's pins clash with ours). Two steps, with latentwatch's own
import and export run in between by the shell script:

    write --out DIR            train a control vector with repeng on the tiny random llama of
                               tests/tiny.py, save it with repeng's export_gguf, and record its
                               directions plus what repeng's ControlModel does to the logits
    check --ours F --out DIR   read latentwatch's export F with repeng's import_gguf and record
                               whether it equals the fixture (values, and bytes)

Seeds are fixed, so a rerun with the pinned versions rewrites the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny.py: torch + transformers only
from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402

FIXTURE = "tiny_llama.gguf"
RECORD = "tiny_llama.json"
COEFFICIENT = 1.5
PROMPT = "The weather today is"
LOGITS_KEPT = 48  # of the last position's 300: enough to pin the effect, small enough to commit
ADJECTIVES = ["sunny", "bright", "calm", "warm", "gentle", "clear", "mild", "soft"]
NOUNS = ["morning", "garden", "river", "street", "window", "forest", "harbour", "field"]

torch.set_num_threads(1)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("repeng", "torch", "transformers", "gguf", "numpy", "scikit-learn"):
        out[dist] = md.version(dist)
    return out


def dataset():
    from repeng import DatasetEntry

    return [
        DatasetEntry(positive=f"I feel happy about the {a} {n}", negative=f"I feel sad about the {a} {n}")
        for a in ADJECTIVES
        for n in NOUNS
    ]


def last_logits(model, tokenizer) -> list[float]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1, :LOGITS_KEPT]
    return [float(x) for x in logits]


def write(out: Path) -> None:
    from repeng import ControlModel, ControlVector

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    base = last_logits(model, tokenizer)
    vector = ControlVector.train(model, tokenizer, dataset(), batch_size=16)  # repeng's defaults: layers n-1 .. 1
    out.mkdir(parents=True, exist_ok=True)
    path = out / FIXTURE
    vector.export_gguf(path)
    back = ControlVector.import_gguf(path)
    assert back == vector, "repeng does not read back what it wrote"
    controlled = ControlModel(model, list(vector.directions))
    controlled.set_control(vector, COEFFICIENT)
    steered = last_logits(controlled, tokenizer)
    controlled.reset()
    assert np.allclose(last_logits(controlled, tokenizer), base), "repeng's reset did not restore the model"
    record = {
        "what": "repeng ControlVector.train on tests/tiny.py tiny_model('llama') (seed 0), saved with export_gguf",
        "versions": versions(),
        "file": FIXTURE,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "model_type": back.model_type,
        "layer_order": list(back.directions),
        "directions": {str(k): [float(x) for x in v] for k, v in back.directions.items()},
        "control": {
            "how": "ControlModel(model, layers).set_control(vector, coefficient): adds coefficient * direction to "
            "the output of model.model.layers[i] at every position",
            "coefficient": COEFFICIENT,
            "prompt": PROMPT,
            "input_ids": tokenizer(PROMPT)["input_ids"],
            "logits_kept": LOGITS_KEPT,
            "last_logits_plain": base,
            "last_logits_controlled": steered,
        },
    }
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"repeng wrote {path} ({path.stat().st_size} bytes, layers {record['layer_order']}); "
        f"controlled logits moved by up to {np.abs(np.subtract(steered, base)).max():.4f}"
    )


def check(ours: Path, out: Path) -> None:
    from repeng import ControlVector

    fixture = ControlVector.import_gguf(out / FIXTURE)
    theirs_read = ControlVector.import_gguf(ours)
    same_layers = list(theirs_read.directions) == list(fixture.directions)
    diff = (
        max(float(np.abs(theirs_read.directions[k] - fixture.directions[k]).max()) for k in fixture.directions)
        if theirs_read.directions.keys() == fixture.directions.keys()
        else None
    )
    result = {
        "how": "latentwatch steer import FIXTURE then steer export -> ours.gguf, read back by repeng's "
        "ControlVector.import_gguf",
        "repeng_equal": theirs_read == fixture,  # ControlVector.__eq__: model_type, layers, every value
        "same_layer_order": same_layers,
        "model_type": theirs_read.model_type,
        "max_abs_diff": diff,
        "byte_identical": ours.read_bytes() == (out / FIXTURE).read_bytes(),
        "ours_sha256": hashlib.sha256(ours.read_bytes()).hexdigest(),
    }
    record = json.loads((out / RECORD).read_text())
    record["roundtrip"] = result
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    print(f"repeng read latentwatch's export: {json.dumps(result)}")
    if not (result["repeng_equal"] and result["byte_identical"]):
        sys.exit("latentwatch's export is not what repeng wrote")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check")
    c.add_argument("--ours", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    write(args.out) if args.step == "write" else check(args.ours, args.out)


if __name__ == "__main__":
    main()
