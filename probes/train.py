"""Train, select, calibrate and evaluate a probe pack through the serving path.

Activations are collected with the same `ModelRunner`, chat formatting and hook points the server
uses, so there is no train/serve skew. Thresholds and metrics are computed from scores produced
by the detector bank itself (`runner.score`), i.e. exactly the numbers a deployment will see.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from monitor.bank import Detector, DetectorBank
from monitor.hooks import HookPoint
from monitor.runner import ModelRunner, encode_all
from probes.data import Example, data_sha256
from probes.evaluate import binary_metrics, threshold_at_fpr
from probes.kinds import probe_kind
from probes.pack import Aggregation, Calibration, Manifest, ProbePack


@dataclass
class TrainSpec:
    """What to train. Several hook points, kinds or pools make a sweep, decided on validation only."""

    pack_id: str
    hook_points: list[str] = field(default_factory=lambda: ["blocks.14.resid_post"])
    # (kind, config) candidates, e.g. [("logistic", {"C": 0.01}), ("lat", {})]
    probes: list[tuple[str, dict]] = field(default_factory=lambda: [("logistic", {})])
    pools: list[str] = field(default_factory=lambda: ["mean"])  # "mean" or "last" token
    input_format: str = "chat"
    target_fpr: float = 0.01
    version: str = "1"
    seed: int = 0
    batch_size: int = 16
    description: str = ""


@dataclass
class TrainData:
    train: list[Example]
    val: list[Example]
    calibration_name: str
    calibration: list[Example]
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    recipe: str | None = None


def _labels(examples: list[Example]) -> np.ndarray:
    missing = [i for i, e in enumerate(examples) if e.label is None]
    if missing:
        raise ValueError(f"{len(missing)} training examples have no label (first at index {missing[0]})")
    return np.array([e.label for e in examples], dtype=int)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sweep(runner: ModelRunner, data: TrainData, spec: TrainSpec, *, progress: bool = True):
    """Fit every (hook point, kind, pool) on train, rank by validation AUROC; return best + table."""
    points = [runner.hooks.resolve(p) for p in spec.hook_points]
    y_train, y_val = _labels(data.train), _labels(data.val)
    if len(set(y_train)) < 2 or len(set(y_val)) < 2:
        raise ValueError("train and validation data must each contain both labels (0 and 1)")
    chat = spec.input_format == "chat"
    items = encode_all(runner, data.train + data.val, chat=chat)
    acts = runner.capture(items, points, batch_size=spec.batch_size, progress=progress)
    n = len(data.train)
    table = []
    for point in points:
        for kind, config in spec.probes:
            cls = probe_kind(kind)
            for pool in spec.pools:
                x = acts[(point, pool)]
                probe = cls(cls.config_cls(**{"seed": spec.seed, **config}))
                probe.fit(x[:n], y_train)
                auroc = float(roc_auc_score(y_val, probe.decision_function(x[n:])))
                table.append({"hook_point": str(point), "kind": kind, "config": config, "pool": pool,
                              "val_auroc": auroc, "probe": probe})
    # Highest validation AUROC; ties go to the shallower hook point (cheaper early stop).
    best = max(table, key=lambda r: (round(r["val_auroc"], 4), -HookPoint.parse(r["hook_point"]).layer))
    return best, [{k: v for k, v in r.items() if k != "probe"} for r in table]


def score_sets(runner: ModelRunner, pack: ProbePack, sets: dict[str, list[Example]], *, batch_size: int = 16,
               progress: bool = False) -> dict[str, np.ndarray]:
    """Aggregate probability per example for each named set, through the detector bank.

    Sets overlap (a combined test set and its parts), so each distinct input is scored once.
    """
    bank = DetectorBank([Detector.from_pack(pack)], device=runner.device)
    index: dict[tuple, int] = {}
    for examples in sets.values():
        for e in examples:
            index.setdefault((e.text, e.messages, e.score_suffix), len(index))
    unique = [Example(text=t, messages=m, score_suffix=sfx) for t, m, sfx in index]
    items = encode_all(runner, unique, chat=pack.manifest.input_format == "chat")
    scores = np.array([r.probs[0] for r in runner.score(items, bank, batch_size=batch_size, progress=progress)])
    return {name: scores[[index[(e.text, e.messages, e.score_suffix)] for e in examples]].reshape(-1)
            for name, examples in sets.items()}


def evaluate_sets(runner: ModelRunner, pack: ProbePack, sets: dict[str, list[Example]], *, batch_size: int = 16,
                  progress: bool = False) -> dict[str, dict[str, float]]:
    """Metrics per named set at the pack's threshold (sets with one label report rates only)."""
    scores = score_sets(runner, pack, sets, batch_size=batch_size, progress=progress)
    return {name: binary_metrics(_labels(sets[name]), scores[name], pack.manifest.threshold) for name in sets}


def train_pack(runner: ModelRunner, data: TrainData, spec: TrainSpec, *, progress: bool = True):
    """Sweep, fit, calibrate on the named benign set, evaluate held-out sets; returns (pack, sweep table)."""
    best, table = sweep(runner, data, spec, progress=progress)
    probe = best["probe"]
    manifest = Manifest(
        schema_version=1,
        id=spec.pack_id,
        version=spec.version,
        kind=best["kind"],
        kind_config=probe.config.model_dump(),
        hook_point=best["hook_point"],
        d_model=runner.d_model,
        aggregation=Aggregation(kind=best["pool"]),
        input_format=spec.input_format,
        threshold=0.5,
        metrics={},
        model=runner.fingerprint,
        provenance={},
        description=spec.description,
    )
    pack = ProbePack(manifest, probe)
    cal = score_sets(runner, pack, {data.calibration_name: data.calibration}, batch_size=spec.batch_size)
    threshold, achieved = threshold_at_fpr(cal[data.calibration_name], spec.target_fpr)
    manifest.threshold = threshold
    manifest.calibration = Calibration(method="target_fpr", target_fpr=spec.target_fpr,
                                       benign_set=data.calibration_name, n_benign=len(data.calibration),
                                       achieved_fpr=achieved)
    manifest.metrics = evaluate_sets(runner, pack, data.eval_sets, batch_size=spec.batch_size, progress=progress)
    params = asdict(spec)
    manifest.provenance = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data_sha256": data_sha256(data.train + data.val),
        "calibration_sha256": data_sha256(data.calibration),
        "git_commit": _git_commit(),
        "recipe": data.recipe,
        "params": params,
        "seed": spec.seed,
        "model_id": runner.model_id,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "selection": {
            "rule": "highest validation AUROC; ties to the shallower hook point",
            "chosen": {k: best[k] for k in ("hook_point", "kind", "config", "pool", "val_auroc")},
            "sweep": table,
        },
        "latentwatch_version": _version(),
    }
    return pack, table


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("latentwatch")
    except PackageNotFoundError:
        return "0+unknown"
