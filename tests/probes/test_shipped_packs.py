"""The packs shipped in probes/packs are what their recipes produce from the shared datasets.

The default test proves it end to end in about a minute, with a recorded tape of the model's
activations in place of the ~14k forward passes (see tests/probes/fixtures/README.md):

1. The recipe rebuilds its splits from the shared datasets: the training and calibration data
   hashes must equal the shipped manifest's, and every row (ids and contents, in order) the
   tape's. The shipped sweep must be the CLI recipe's grid, the chosen configuration in it.
2. The real model re-captures a recorded random subset of the tape's rows (200 per pack) and must
   give the same pooled activations (1e-4); the real detector bank must score some of them as the
   replay does (for a mean-aggregated affine head, the mean of per-token logits is the logit of
   the mean activation; for a windowed aggregation the tape holds token logits, re-derived here).
3. `train_pack` itself runs at the pack's chosen configuration on a runner that replays the
   tape: the same code draws the folds and held-out sources, refits, scores the chosen
   aggregation, fits Platt scaling, calibrates out of fold and evaluates. Weights (5e-4: the tape
   is float16), threshold (1e-3), calibration, the chosen candidate's cross-validated and
   held-out-source numbers (1e-4) and every shipped metric of every set (0.01) must match.

Comparing aggregations needs every token under every held-out-source model, so the replay scores
the chosen one only; full retraining through the model (harmful_intent at its chosen
configuration; deception's whole CLI recipe, including the 55-candidate sweep) runs only with
LATENTWATCH_FULL_REPRO=1. After retraining a shipped pack, re-record its tape:
`.venv/bin/python scripts/make-pack-fixtures.py [PACK_ID ...]` (~10 minutes a pack on 2 cores).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from monitor import cli
from monitor.runner import encode_all
from probes import train
from probes.completion import (
    ANSWERS_INFO,
    CatchCurve,
    answer_row,
    answers,
    catch_curve,
    catch_curve_requests,
    completion_requests,
    completion_sets,
    read_answers,
)
from probes.data import Example, data_sha256
from probes.pack import ProbePack, shipped_packs
from probes.recipes import RECIPES, datasets_dir
from probes.train import TrainData, TrainSpec, train_pack
from probes.vectors import load_vector_pack, shipped_vectors_dir

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "shipped_packs"
FULL = pytest.mark.skipif(os.environ.get("LATENTWATCH_FULL_REPRO") != "1",
                          reason="full retraining through the model; set LATENTWATCH_FULL_REPRO=1")
PACKS = ("harmful_intent", "deception", "harmful_completion")
N_SPOT = 200  # rows per pack the model re-captures; the detector bank re-scores every BANK_STRIDE-th
BANK_STRIDE = 8


def shipped(pack_id: str, runner) -> ProbePack:
    return ProbePack.load(shipped_packs()[pack_id][0], expect=runner.fingerprint)


def assert_same_pack(fresh: ProbePack, ref: ProbePack, sets: list[str], weights_atol: float = 1e-4) -> None:
    """Weights to `weights_atol`, threshold to 1e-3, every metric of these sets to 0.01 (so counts exactly;
    a held-out source's rate at the 1% FPR point to one row)."""
    for name, t in ref.probe.tensors().items():
        np.testing.assert_allclose(fresh.probe.tensors()[name].numpy(), t.numpy(), atol=weights_atol, rtol=1e-4)
    assert fresh.manifest.threshold == pytest.approx(ref.manifest.threshold, abs=1e-3)
    if ref.manifest.platt is None:
        assert fresh.manifest.platt is None
    else:
        got, want = fresh.manifest.platt, ref.manifest.platt
        assert (got.n, got.fitted_on) == (want.n, want.fitted_on)
        assert (got.a, got.b) == (pytest.approx(want.a, abs=1e-4), pytest.approx(want.b, abs=1e-4))
    assert fresh.manifest.calibration == ref.manifest.calibration
    for name in sets:
        got, want = fresh.manifest.metrics[name], ref.manifest.metrics[name]
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            # a held-out source's rate at the pooled 1% FPR point: that threshold is one benign row's own
            # score, which float rounding can put either side of itself; in a unit of 3 rows that is 0.33
            n = want.get("n_neg" if key.startswith("fpr") else "n_pos") or 0
            tol = max(0.01, 1 / n) if name.startswith("loso/") and key.endswith("_at_1pct_fpr") and n else 0.01
            assert got[key] == pytest.approx(value, abs=tol), (name, key)


# ------------------------------------------------------------------------------ the tape

def recipe_inputs(ref: ProbePack, written_rows: dict | None = None) -> tuple[TrainData, TrainSpec]:
    """The recipe's data as `latentwatch train --recipe` builds it, and the pack's chosen configuration.
    A recipe whose rows the model writes takes them (per side and part; see `probes.completion`)."""
    m, prov = ref.manifest, ref.manifest.provenance
    chosen = prov["selection"]["chosen"]
    if written(ref):
        splits = completion_sets(written_rows)
    else:
        splits = RECIPES[prov["recipe"]](datasets_dir(None), seed=prov["seed"])
    sweep = cli.RECIPE_SWEEPS[prov["recipe"]]
    cal = sweep["calibration"]
    data = TrainData(splits.train + splits.val, cal, splits.calibration[cal],
                     {"test": splits.test, **splits.eval_sets}, recipe=prov["recipe"])
    spec = TrainSpec(pack_id=m.id, hook_points=[chosen["hook_point"]], probes=[(chosen["kind"], chosen["config"])],
                     pools=[chosen["pool"]], input_format=m.input_format, target_fpr=m.calibration.target_fpr,
                     version=m.version, seed=prov["seed"], batch_size=prov["params"]["batch_size"],
                     folds=prov["params"]["folds"], description=sweep.get("description", ""),
                     enabled_by_default=sweep.get("enabled_by_default", True), selection=sweep.get("selection", "cv"),
                     reads=sweep.get("reads", "both"),
                     # the chosen aggregation only: comparing all of them needs every token (LATENTWATCH_FULL_REPRO)
                     aggregations=[m.aggregation.model_dump(exclude_none=True)] if "aggregations" in sweep else None)
    return data, spec


def assert_swept_over_the_cli_grid(ref: ProbePack, runner) -> None:
    """The shipped pack's sweep was the CLI recipe's, and the chosen configuration is in it."""
    params, chosen = ref.manifest.provenance["params"], ref.manifest.provenance["selection"]["chosen"]
    sweep = cli.RECIPE_SWEEPS[ref.manifest.provenance["recipe"]]
    assert params["hook_points"] == cli.sweep_hook_points(runner.hooks.num_layers, sweep.get("sites", ("resid_post",)))
    assert params["probes"] == [list(p) for p in sweep["probes"]] and params["pools"] == sweep["pools"]
    assert (params["selection"], params["aggregations"]) == (sweep.get("selection", "cv"), sweep.get("aggregations"))
    assert params["version"] == ref.manifest.version == sweep.get("version", "1")
    if sweep.get("aggregations"):
        assert ref.manifest.aggregation.model_dump(exclude_none=True) in sweep["aggregations"]
    assert chosen["hook_point"] in params["hook_points"] and chosen["pool"] in params["pools"]
    assert [chosen["kind"], chosen["config"]] in params["probes"]


def written(ref: ProbePack) -> bool:
    """Whether the pack's rows are the model's own answers: their text is not in the repo, only its
    hash; the tape's rows stand in for them (`stand_ins`), and the test regenerates a few (`SPOT_PARTS`)."""
    return ref.manifest.provenance["recipe"] in cli.MODEL_RECIPES


SPOT_PARTS = ("harmful", "benign", "steered")  # of the test side: each part's first generation batch
SPOT_BATCH = 16  # `completion_splits`' batch size: the same batch gives the same greedy answers


def answer_sha256(e: Example) -> str:
    return hashlib.sha256(e.score_suffix.encode()).hexdigest()


def stand_ins(record: dict, requests: dict) -> dict:
    """The answers of a written recipe with a placeholder for each text (its sha256), from the
    tape's `written` record (per side/part the row ids; per id its label and text hash) and the
    recipe's requests."""
    asked = {e.id: e for parts in requests.values() for rows in parts.values() for e in rows}
    out: dict = {}
    for key, ids in record["parts"].items():
        side, part = key.split("/")
        rows = out.setdefault(side, {}).setdefault(part, [])
        for rid in ids:
            request, how = rid.rsplit("+", 1)
            label, sha = record["rows"][rid]
            rows.append(answer_row(asked[request], f"[answer sha256:{sha}]", how, label))
    return out


def written_record(answers: dict) -> dict:
    return {"parts": {f"{side}/{part}": [e.id for e in rows] for side, parts in answers.items()
                      for part, rows in parts.items()},
            "rows": {e.id: [e.label, answer_sha256(e)] for parts in answers.values() for rows in parts.values()
                     for e in rows}}


def recipe_requests(ref: ProbePack) -> dict:
    return _requests(ref.manifest.provenance["seed"])


@functools.cache
def _requests(seed: int) -> dict:
    return completion_requests(datasets_dir(None), seed)


def spot_batches(ref: ProbePack) -> list[tuple[str, list[Example]]]:
    """(how, requests) of the first generation batch of each `SPOT_PARTS` of the test side."""
    test = recipe_requests(ref)["test"]
    return [("refusal" if part == "steered" else "answer",
             test["benign" if part == "benign" else "harmful"][:SPOT_BATCH]) for part in SPOT_PARTS]


def spot_ids(ref: ProbePack) -> set[str]:
    """The ids their answers have (an empty answer is dropped, so not every one is a row)."""
    return {f"{e.id}+{how}" for how, batch in spot_batches(ref) for e in batch}


def regenerate_spot(runner, ref: ProbePack) -> list[Example]:
    """Those batches answered again by the model."""
    refusal = load_vector_pack(shipped_vectors_dir() / "refusal", expect=runner.fingerprint).steering()
    return [e for how, batch in spot_batches(ref)
            for e in answers(runner, batch, how=how, steering=refusal if how == "refusal" else None,
                             batch_size=SPOT_BATCH)]


def tape_sets(data: TrainData) -> dict[str, list[Example]]:
    return {"dev": data.dev, "calibration": data.calibration, **{f"eval/{k}": v for k, v in data.eval_sets.items()}}


def tape_rows(data: TrainData) -> list[Example]:
    """Every distinct scored input once, first seen first: the rows of the tape."""
    rows: dict[tuple, Example] = {}
    for examples in tape_sets(data).values():
        for e in examples:
            rows.setdefault(e.scoring_key, e)
    return list(rows.values())


def rows_sha256(rows: list[Example]) -> str:
    """Ordered, unlike `data_sha256`: row i of the tape must be input i of the recipe."""
    return hashlib.sha256("".join(data_sha256([e]) for e in rows).encode()).hexdigest()


def capture(runner, rows: list[Example], spec: TrainSpec, *, batch_size: int, progress: bool = False) -> np.ndarray:
    """Pooled activations [rows, d_model] at the pack's hook point, as `train.sweep` collects them."""
    point = runner.hooks.resolve(spec.hook_points[0])
    items = encode_all(runner, rows, chat=spec.input_format == "chat")
    return runner.capture(items, [point], batch_size=batch_size, progress=progress)[(point, spec.pools[0])]


def record_tape(runner, pack_id: str, folder: Path = FIXTURES, *, answers: Path | None = None,
                progress: bool = True) -> None:
    """Write <pack_id>.json (hashes, row ids, spot rows) and <pack_id>.safetensors (activations).

    Activations are stored as float16 offsets from a float32 per-feature centre: the residual
    stream's large constant components would otherwise eat float16's precision. A pack whose bank
    aggregation is not the mean also gets token logits (`token_logits`). A written recipe's
    answers are read from `answers` (`train --answers`; generated into it when it is empty); the
    tape keeps their hashes, and its rows and sets are the stand-ins the test rebuilds. Its tape is
    small, so it keeps the training rows' pooled activations exactly as `train.sweep` captured them
    (`dev_pooled`, float32; its tiny held-out units of 3-11 refusals tell one rounding from another).
    """
    ref = shipped(pack_id, runner)
    real = None
    if written(ref):
        if not (answers / ANSWERS_INFO).is_file():
            cli.completion_recipe(runner, datasets_dir(None), ref.manifest.provenance["seed"], answers)
        real = read_answers(answers)
    data, spec = recipe_inputs(ref, real)
    prov = ref.manifest.provenance
    assert (data_sha256(data.dev), data_sha256(data.calibration)) == \
        (prov["data_sha256"], prov["calibration_sha256"]), "these are not the rows the shipped pack was trained on"
    rows = tape_rows(data)
    tokens = ref.manifest.aggregation.kind != "mean"
    if tokens:  # one pass for both: the pooled mean is the mean of the token states
        states = token_states(runner, rows, spec, batch_size=spec.batch_size, progress=progress)
        x = np.stack([h.mean(0) for h in states])
    else:
        x = capture(runner, rows, spec, batch_size=spec.batch_size, progress=progress)
    centre = x.astype(np.float64).mean(0).astype(np.float32)
    if real is None:
        tensors = {"centre": torch.from_numpy(centre), "offset": torch.from_numpy(x - centre).half()}
    else:  # as the sweep read them: the same rows in the same batches
        tensors = {"dev_pooled": torch.from_numpy(capture(runner, data.dev, spec, batch_size=spec.batch_size))}
    at = {e.scoring_key: i for i, e in enumerate(rows)}
    dev_rows = [at[e.scoring_key] for e in data.dev] if real is not None else None
    if real is None:
        spot = np.sort(np.random.default_rng(0).choice(len(rows), N_SPOT, replace=False))
    else:  # the rows the test can regenerate; from here on the tape speaks of their stand-ins
        record = written_record(real) | {"data_sha256": {"dev": prov["data_sha256"],
                                                          "calibration": prov["calibration_sha256"]}}
        regenerable = spot_ids(ref)
        spot = np.array([i for i, e in enumerate(rows) if e.id in regenerable])
        data, _ = recipe_inputs(ref, stand_ins(record, recipe_requests(ref)))
        rows = tape_rows(data)
    tensors["spot"] = torch.from_numpy(x[spot])
    meta = {
        "pack_id": pack_id,
        "recorded_with": "scripts/make-pack-fixtures.py",
        "hook_point": spec.hook_points[0],
        "pool": spec.pools[0],
        "input_format": spec.input_format,
        "sets": {name: {"n": len(v), "data_sha256": data_sha256(v)} for name, v in tape_sets(data).items()},
        "rows": {"n": len(rows), "sha256": rows_sha256(rows), "ids": [e.id for e in rows]},
        "spot_rows": spot.tolist(),
        "token_logits": tokens,
        **({"written": record, "dev_rows": dev_rows} if real is not None else {}),
    }
    if tokens:
        dev = tensors["dev_pooled"].numpy() if real is not None else None
        replay = ReplayRunner(runner, Tape(meta, centre, x, x[spot], rows, dev=dev))
        meta["roles"], by_role = role_logits(replay, states, data, spec)
        for role, logits in by_role.items():
            lengths = [0 if t is None else len(t) for t in logits]
            flat = [t for t in logits if t is not None]
            tensors[f"{role}_logits"] = torch.from_numpy(np.concatenate(flat).astype(np.float32))
            tensors[f"{role}_lengths"] = torch.tensor(lengths, dtype=torch.int32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / f"{pack_id}.safetensors")
    (folder / f"{pack_id}.json").write_text(json.dumps(meta, indent=1) + "\n")


def token_states(runner, rows: list[Example], spec: TrainSpec, *, batch_size: int,
                 progress: bool = False) -> list[np.ndarray]:
    """Every row's scored-token activations [tokens, d_model] at the pack's hook point: what the
    bank's heads read, through the hooks `ModelRunner.capture` uses."""
    from monitor.runner import HookPass

    point = runner.hooks.resolve(spec.hook_points[0])
    items = encode_all(runner, rows, chat=spec.input_format == "chat")
    out: list[np.ndarray | None] = [None] * len(rows)
    with runner.attached([point]):
        for idx, b in runner.batches(items, batch_size, "collecting token activations", progress):
            def keep(h, idx=idx, scored=b["scored"]):
                for r, i in enumerate(idx):
                    out[i] = h[r][scored[r]].float().cpu().numpy()

            runner.hook_pass = HookPass(capture={point: keep}, stop_at=point)
            runner.forward(b, logits=False)
    return out


def roles(replay: ReplayRunner, data: TrainData, best: dict) -> dict[str, list[str | None]]:
    """Which model reads each tape row in `train_pack`: `unit` (choosing the aggregation: the model
    that never saw the row's source) for training rows; `oof` (calibration and held-out sets: the
    fold model that never saw a training row, else the final one) for what it scores after that.
    Per role and tape row: "final", "fold<k>", "unit<k>", or None where the role does not read it."""
    out: dict[str, list[str | None]] = {"unit": [None] * len(replay.row), "oof": [None] * len(replay.row)}

    def read(role: str, e: Example, model: str) -> None:
        r = replay.row[e.scoring_key]
        assert out[role][r] in (None, model), f"{e.id}: read by {out[role][r]} and {model}"
        out[role][r] = model

    for k, (_, _, held) in enumerate(best["units"]):
        for i in held:
            read("unit", data.dev[i], f"unit{k}")
    fold_of = train.held_out_fold(data.dev, best["folds"])
    for e in [*data.calibration, *(e for rows in data.eval_sets.values() for e in rows)]:
        read("oof", e, f"fold{fold_of[e.scoring_key]}" if e.scoring_key in fold_of else "final")
    return out


def role_models(best: dict) -> dict[str, object]:
    return {"final": best["probe"], **{f"fold{k}": p for k, p in enumerate(best["fold_probes"])},
            **{f"unit{k}": p for k, p in enumerate(best["unit_probes"])}}


def role_logits(replay: ReplayRunner, states: list[np.ndarray], data: TrainData, spec: TrainSpec
                ) -> tuple[dict[str, list[str | None]], dict[str, list[np.ndarray | None]]]:
    """`roles`, and per role each tape row's token logits under the model that reads it there."""
    best, _ = train.sweep(replay, data, spec, progress=False)
    models, names = role_models(best), roles(replay, data, best)
    return names, {role: [None if m is None else models[m].decision_function(h) for m, h in zip(row_models, states)]
                   for role, row_models in names.items()}


def bank_aggregate(pack: ProbePack, logits: list[np.ndarray]) -> np.ndarray:
    """Probabilities the bank's own aggregation (`BankState.update`) gives these token logits
    (of the probe, before the pack's Platt scaling), left-padded like `ModelRunner.batch`."""
    from monitor.bank import Detector, DetectorBank

    if (platt := pack.manifest.platt) is not None:
        logits = [platt.a * t + platt.b for t in logits]
    bank = DetectorBank([Detector.from_pack(pack)], device="cpu")
    n, width = len(logits), max(len(t) for t in logits)
    state, mask = bank.state(n), torch.zeros(n, width, dtype=torch.bool)
    state.begin_step(n, width)
    for r, t in enumerate(logits):
        state.step_logits[r, width - len(t):, 0] = torch.from_numpy(t)
        mask[r, width - len(t):] = True
    with torch.no_grad():
        return torch.sigmoid(state.update(mask, prompt=True))[:, 0].numpy()


def tape_meta(pack_id: str) -> dict:
    return json.loads((FIXTURES / f"{pack_id}.json").read_text())


def recorded_answers(ref: ProbePack) -> dict | None:
    """A written recipe's answers as the tape records them (stand-ins); None for the others."""
    return stand_ins(tape_meta(ref.manifest.id)["written"], recipe_requests(ref)) if written(ref) else None


@dataclass
class Tape:
    meta: dict
    centre: np.ndarray | None  # float32 [d_model]; None with `dev`
    x: np.ndarray  # float32 [rows, d_model]: centre + float16 offset, or `dev` at its rows and NaN
    spot: np.ndarray  # float32 [spot rows, d_model], exactly as captured
    rows: list[Example]
    # with meta["token_logits"]: per role ("unit", "oof"; see `roles`), each row's token logits or None
    logits: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    # a written recipe's: the training rows' pooled activations as the sweep read them (meta["dev_rows"])
    dev: np.ndarray | None = None

    @classmethod
    def load(cls, pack_id: str, data: TrainData) -> Tape:
        """The recorded tape, once the recipe's rows are shown to be the ones it was recorded on."""
        meta = tape_meta(pack_id)
        t = load_file(FIXTURES / f"{pack_id}.safetensors")
        rows = tape_rows(data)
        sets = {name: {"n": len(v), "data_sha256": data_sha256(v)} for name, v in tape_sets(data).items()}
        assert sets == meta["sets"], "the recipe's splits changed since the tape was recorded"
        assert [e.id for e in rows] == meta["rows"]["ids"] and rows_sha256(rows) == meta["rows"]["sha256"]
        logits = {}
        for role in ("unit", "oof") if meta.get("token_logits") else ():
            flat, lengths = t[f"{role}_logits"].numpy(), t[f"{role}_lengths"].numpy()
            ends = np.cumsum(lengths)
            logits[role] = [flat[e - n:e] if n else None for e, n in zip(ends, lengths)]
        if "dev_pooled" in t:  # no other row's activations are read: NaN shows a read of one
            x = np.full((len(rows), t["dev_pooled"].shape[1]), np.nan, dtype=np.float32)
            x[meta["dev_rows"]] = dev = t["dev_pooled"].numpy()
            return cls(meta, None, x, t["spot"].numpy(), rows, logits, dev)
        return cls(meta, t["centre"].numpy(), (t["centre"] + t["offset"].float()).numpy(), t["spot"].numpy(), rows,
                   logits)

    # a written recipe's spot rows as the model writes them again (`regenerate_spot`): the tape's are stand-ins
    regenerated: list[Example] | None = None

    @property
    def spot_rows(self) -> list[Example]:
        if self.regenerated is None:
            return [self.rows[i] for i in self.meta["spot_rows"]]
        by_id = {e.id: e for e in self.regenerated}
        return [by_id[self.rows[i].id] for i in self.meta["spot_rows"]]


class ReplayRunner:
    """The part of `ModelRunner` that `train_pack` uses, answered from the tape.

    Identity (hooks, d_model, fingerprint) is the real runner's. `encode` returns the tape row.
    """

    def __init__(self, runner, tape: Tape):
        self.hooks, self.d_model, self.model_id = runner.hooks, runner.d_model, runner.model_id
        self.fingerprint = runner.fingerprint
        self.tape = tape
        self.row = {e.scoring_key: i for i, e in enumerate(tape.rows)}

    def encode(self, text=None, messages=None, *, chat: bool, score_suffix=None) -> int:
        assert chat == (self.tape.meta["input_format"] == "chat")
        return self.row[(text, messages, score_suffix)]

    def capture(self, items: list[int], points, **_) -> dict:
        assert [str(p) for p in points] == [self.tape.meta["hook_point"]]
        if self.tape.dev is not None:
            assert list(items) == self.tape.meta["dev_rows"], "this tape holds the training rows' activations only"
            return {(points[0], self.tape.meta["pool"]): self.tape.dev}
        return {(points[0], self.tape.meta["pool"]): self.tape.x[items]}


def replay_scores(runner: ReplayRunner, packs: list[ProbePack], examples: list[Example], **_) -> np.ndarray:
    """`train.bank_scores` from the tape. Mean aggregation: sigmoid(head(mean activation)) in
    float32, like the bank. Else the bank's aggregation of the recorded token logits of the model
    each pack stands for; NaN where that model never reads the row in `train_pack` (so a wrong read
    cannot pass unseen)."""
    tape, rows = runner.tape, [runner.row[e.scoring_key] for e in examples]
    if not tape.logits:
        return np.stack([probs(p, torch.from_numpy(tape.x[rows]), tape.meta) for p in packs], axis=1)
    out = np.full((len(rows), len(packs)), np.nan)
    for j, p in enumerate(packs):
        role, model = pack_model(p)
        read = [i for i, r in enumerate(rows) if tape.meta["roles"][role][r] == model]
        if read:
            out[read, j] = bank_aggregate(p, [tape.logits[role][rows[i]] for i in read])
    return out


def pack_model(pack: ProbePack) -> tuple[str, str]:
    """(role, model) of a pack `train_pack` builds, by the id it gives it."""
    if m := re.search(r"-a\d+-u(\d+)$", pack.manifest.id):  # choose_aggregation
        return "unit", f"unit{m[1]}"
    if m := re.search(r"-fold(\d+)$", pack.manifest.id):  # out_of_fold_scores
        return "oof", f"fold{m[1]}"
    return "oof", "final"


def probs(pack: ProbePack, x: torch.Tensor, meta: dict) -> np.ndarray:
    m, head = pack.manifest, pack.head()
    assert m.hook_point == meta["hook_point"] and m.aggregation.kind == "mean" and head.w2 is None, \
        "a tape replays only mean-aggregated affine heads at the hook point it was recorded at"
    with torch.no_grad():
        return torch.sigmoid(head.logits(x)).numpy()


def assert_tape_is_the_model(runner, ref: ProbePack, tape: Tape, data: TrainData, spec: TrainSpec) -> None:
    """The real model re-captures the spot rows, and the real bank scores them as the replay does."""
    # One row at a time: batched with rows of other lengths, a short row's activations moved by up to
    # 2e-3 at block 14 (float32 CPU); the recording batched rows of equal length together.
    live = capture(runner, tape.spot_rows, spec, batch_size=1)
    np.testing.assert_allclose(live, tape.spot, rtol=1e-4, atol=1e-4)
    if tape.centre is not None:
        stored = tape.x[tape.meta["spot_rows"]]  # the float16 copy the replay uses, within its rounding
        assert (np.abs(stored - tape.spot) <= np.abs(tape.spot - tape.centre) * 2**-10 + 1e-4).all()
    bank = train.bank_scores(runner, [ref], tape.spot_rows[::BANK_STRIDE], batch_size=1)[:, 0]
    if not tape.logits:
        replayed = probs(ref, torch.from_numpy(tape.spot[::BANK_STRIDE]), tape.meta)
        np.testing.assert_allclose(bank, replayed, atol=1e-5)
        return
    states = token_states(runner, tape.spot_rows, spec, batch_size=1)
    replayed = bank_aggregate(ref, [ref.probe.decision_function(h) for h in states[::BANK_STRIDE]])
    np.testing.assert_allclose(bank, replayed, atol=1e-5)
    # the recorded token logits are these activations under the models train_pack refits from the tape
    # (which differ from the recording's by the tape's float16 rounding)
    models = role_models(train.sweep(ReplayRunner(runner, tape), data, spec, progress=False)[0])
    for role, names in tape.meta["roles"].items():
        for r, h in zip(tape.meta["spot_rows"], states):
            if names[r] is not None:
                np.testing.assert_allclose(models[names[r]].decision_function(h), tape.logits[role][r], atol=0.05)


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("pack_id", PACKS)
def test_recipe_reproduces_the_shipped_pack(pack_id, smollm2, monkeypatch):
    ref = shipped(pack_id, smollm2)
    data, spec = recipe_inputs(ref, recorded_answers(ref))
    prov = ref.manifest.provenance
    tape = Tape.load(pack_id, data)
    if written(ref):  # the model writes the recorded answers: a batch of each part, the same text and label
        tape.regenerated = regenerate_spot(smollm2, ref)
        record = tape.meta["written"]
        assert {e.id: [e.label, answer_sha256(e)] for e in tape.regenerated} == \
            {i: record["rows"][i] for i in spot_ids(ref) if i in record["rows"]}
        assert record["data_sha256"] == {"dev": prov["data_sha256"], "calibration": prov["calibration_sha256"]}
    else:
        assert (data_sha256(data.dev), data_sha256(data.calibration)) == \
            (prov["data_sha256"], prov["calibration_sha256"])
    assert (tape.meta["hook_point"], tape.meta["pool"]) == (spec.hook_points[0], spec.pools[0])
    assert_swept_over_the_cli_grid(ref, smollm2)
    assert_tape_is_the_model(smollm2, ref, tape, data, spec)

    monkeypatch.setattr(train, "bank_scores", replay_scores)
    fresh, _ = train_pack(ReplayRunner(smollm2, tape), data, spec, progress=False)
    assert fresh.manifest.provenance["data_sha256"] == data_sha256(data.dev)
    chosen = prov["selection"]["chosen"]
    for key in [k for k in chosen if k == "cv_auroc" or k.startswith("loso_")]:
        # the worst unit can be tiny (harmful_completion: 4 refusals of CatQA requests), where the tape's
        # float16 rounding swapping two close scores moves its AUROC by 1/(4 x 1,171) = 2e-4
        tol = 1e-3 if key == "loso_worst_unit_auroc" else 1e-4
        assert fresh.manifest.provenance["selection"]["chosen"][key] == pytest.approx(chosen[key], abs=tol), key
    assert (fresh.manifest.description, fresh.manifest.enabled_by_default, fresh.manifest.reads) == \
        (ref.manifest.description, ref.manifest.enabled_by_default, ref.manifest.reads)
    # the catch curve is measured after training, by generating (test_the_catch_curve_is_what_the_model_writes)
    sets = [k for k in ref.manifest.metrics if k != "catch_curve"]
    assert fresh.manifest.metrics.keys() == set(sets)
    # the tape's float16 rounding moves a refit's weights by up to ~2e-4 (deception: 4,206 rows, C = 0.01)
    assert_same_pack(fresh, ref, sets, weights_atol=5e-4)


@FULL
def test_harmful_intent_recipe_retrains_to_the_shipped_pack(smollm2):
    ref = shipped("harmful_intent", smollm2)
    data, spec = recipe_inputs(ref)
    data.eval_sets = {"test": data.eval_sets["test"]}
    fresh, _ = train_pack(smollm2, data, spec, progress=False)
    assert ref.manifest.provenance["data_sha256"] == fresh.manifest.provenance["data_sha256"]
    assert_same_pack(fresh, ref, ["test"])


@FULL
def test_deception_recipe_reproduces_the_shipped_pack(smollm2, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_runner", lambda model, device: smollm2)
    result = CliRunner().invoke(cli.app, ["train", "--recipe", "deception_v2", "--id", "deception",
                                          "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    fresh, ref = ProbePack.load(tmp_path / "d"), shipped("deception", smollm2)
    assert not fresh.manifest.enabled_by_default and not ref.manifest.enabled_by_default
    assert fresh.manifest.provenance["selection"]["chosen"] == ref.manifest.provenance["selection"]["chosen"]
    assert_same_pack(fresh, ref, ["liedetector_qa"])
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["description"] == ref.manifest.description


def test_the_catch_curve_is_what_the_model_writes(smollm2):
    """harmful_completion's catch curve: its numbers are the recorded first hits', and the model
    gives the first generation batch of each side of them again."""
    ref, intent = shipped("harmful_completion", smollm2), shipped("harmful_intent", smollm2)
    record = ref.manifest.provenance["catch_curve"]
    assert ref.manifest.metrics["catch_curve"] == pytest.approx(
        {k: v for k, v in CatchCurve(**record).summary().items() if v is not None})
    wrapped, benign = catch_curve_requests(datasets_dir(None), ref.manifest.provenance["seed"])
    by_id = {e.id: e for e in [*wrapped, *benign]}
    harmful, benign = ([by_id[i] for i in record[f"{side}_ids"][:SPOT_BATCH]] for side in ("harmful", "benign"))
    again = catch_curve(smollm2, intent, ref, harmful, benign, max_new_tokens=record["max_new_tokens"],
                        batch_size=SPOT_BATCH)
    assert again.let_through == len(harmful)  # each was let through on the prompt, and still is
    assert (again.harmful, again.benign) == (record["harmful"][:SPOT_BATCH], record["benign"][:SPOT_BATCH])


@FULL
def test_harmful_completion_recipe_retrains_to_the_shipped_pack(smollm2, monkeypatch, tmp_path):
    """The whole CLI recipe: the model answers every request again, then sweep, catch curve."""
    monkeypatch.setattr(cli, "load_runner", lambda model, device: smollm2)
    result = CliRunner().invoke(cli.app, ["train", "--recipe", "harmful_completion", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    fresh, ref = ProbePack.load(tmp_path / "c"), shipped("harmful_completion", smollm2)
    assert fresh.manifest.provenance["data_sha256"] == ref.manifest.provenance["data_sha256"]
    assert fresh.manifest.provenance["selection"]["chosen"] == ref.manifest.provenance["selection"]["chosen"]
    assert fresh.manifest.provenance["catch_curve"] == ref.manifest.provenance["catch_curve"]
    assert_same_pack(fresh, ref, list(ref.manifest.metrics))


# -------------------------------------------------------------------------- how they behave

# Benign text a user may paste many times over: a statement, a question, and the single token that
# mean pooling once scored 0.88. Counts from 1 to 300, denser where short inputs change fastest.
REPEATED = ("The weather in Rome is lovely in spring. ", "What time does the library open on Sundays? ", " I")
REPEATS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300)


def test_benign_text_repeated_up_to_300_times_never_crosses_harmful_intents_threshold(smollm2):
    """Long or repetitive input must not drift into a flag (issue 12: x60 once scored 0.91)."""
    ref = shipped("harmful_intent", smollm2)
    rows = [Example(text=(s * k).strip()) for s in REPEATED for k in REPEATS]
    scores = train.bank_scores(smollm2, [ref], rows, batch_size=1)[:, 0]
    worst = int(np.argmax(scores))
    assert scores[worst] < ref.manifest.threshold, \
        f"{REPEATED[worst // len(REPEATS)]!r} x{REPEATS[worst % len(REPEATS)]} scored {scores[worst]:.3f}"
