"""Train, select, calibrate and evaluate a probe pack through the serving path.

Activations are collected with the same `ModelRunner`, chat formatting and hook points the server
uses, so there is no train/serve skew. Thresholds and metrics are computed from scores produced
by the detector bank itself (`runner.score`), i.e. exactly the numbers a deployment will see.

Selection and calibration use K-fold cross-validation over the development data (grouped, so a
behaviour never sits on both sides of a fold): every candidate is ranked by its out-of-fold AUROC,
the winner is refitted on all of the data, and benign calibration rows that were trained on are
scored by the fold model that did not see them. All labelled data trains the shipped probe, and
the threshold still comes from scores on unseen rows.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
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
    pools: list[str] = field(default_factory=lambda: ["mean"])  # "mean", "last" (or "max": SAE latents)
    # An SAE reference (monitor.sae.store.resolve): SAE-feature kinds train on its pooled latents, at its hook point
    sae: str | None = None
    input_format: str = "chat"
    target_fpr: float = 0.01
    version: str = "1"
    seed: int = 0
    batch_size: int = 16
    folds: int = 5
    description: str = ""
    enabled_by_default: bool = True


@dataclass
class TrainData:
    """`dev` is every labelled row for fitting and selection; `calibration` may overlap it."""

    dev: list[Example]
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
    """HEAD of the checkout this code runs from, `+dirty` when tracked files differ from it."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return f"{head}+dirty" if head and git("status", "--porcelain", "--untracked-files=no") else head or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dev_folds(examples: list[Example], folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K folds that keep each `group` on one side (ungrouped rows are their own group)."""
    y = _labels(examples)
    groups = [e.group or f"row:{i}" for i, e in enumerate(examples)]
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    for label in (0, 1):
        n = len({g for g, lab in zip(groups, y) if lab == label})
        if n < folds:
            raise ValueError(f"{folds}-fold cross-validation needs >= {folds} groups with label {label}, "
                             f"the data has {n}: add examples or lower --folds")
    split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return list(split.split(np.zeros(len(y)), y, groups))


def _fit(kind: str, config: dict, seed: int, x: np.ndarray, y: np.ndarray, sae=None):
    cls = probe_kind(kind)
    probe = cls(cls.config_cls(**{"seed": seed, **config}))
    probe.fit(x, y)
    if sae is not None:
        probe.sae = sae
    return probe


def _candidates(spec: TrainSpec, points: list, sae) -> list[tuple]:
    """(hook point, kind, config, pool) to cross-validate: SAE-feature kinds with an SAE (and only then),
    each kind with the pools its head is exact under."""
    from monitor.sae.store import files_sha256, resolve
    from probes.kinds.sae_base import SAEKind

    out = []
    for kind, config in spec.probes:
        reads_sae = issubclass(probe_kind(kind), SAEKind)
        if reads_sae and sae is None:
            raise ValueError(f"probe kind {kind!r} needs an SAE (--sae) whose latents it reads")
        if sae is not None and not reads_sae:
            raise ValueError(f"probe kind {kind!r} reads activations, not SAE latents; leave out --sae or pick "
                             "an SAE kind (sae_probe, sae_latent)")
        if sae is not None:
            config = {"sae": spec.sae, "sae_sha256": files_sha256(resolve(spec.sae)), **config}
        pools = [p for p in spec.pools if p in probe_kind(kind).pools]
        if not pools:
            raise ValueError(f"probe kind {kind!r} trains on {' or '.join(probe_kind(kind).pools)} pooling, "
                             f"not {', '.join(spec.pools)}")
        out += [(point, kind, config, pool) for point in points for pool in pools]
    return out


def sweep(runner: ModelRunner, data: TrainData, spec: TrainSpec, *, progress: bool = True):
    """Rank every (hook point, kind, pool) by out-of-fold AUROC; refit the best on all of `dev`.

    With `spec.sae`, the candidates read that SAE's latents at its hook point.
    Returns (best row with the refitted `probe` and its per-fold `fold_probes`, `folds`; table).
    """
    sae = None
    if spec.sae is not None:
        from monitor.sae.store import open_sae

        sae = open_sae(spec.sae, expect=runner.fingerprint, d_model=runner.d_model)
        points = [runner.hooks.resolve(sae.hook_point)]
    else:
        points = [runner.hooks.resolve(p) for p in spec.hook_points]
    candidates = _candidates(spec, points, sae)
    y = _labels(data.dev)
    if len(set(y)) < 2:
        raise ValueError("the training data must contain both labels (0 and 1)")
    folds = dev_folds(data.dev, spec.folds, spec.seed)
    items = encode_all(runner, data.dev, chat=spec.input_format == "chat")
    acts = runner.capture(items, points, batch_size=spec.batch_size, progress=progress,
                          encode=None if sae is None else sae.to(runner.device).encode)
    table = []
    for point, kind, config, pool in tqdm(candidates, desc=f"{spec.folds}-fold cross-validation", unit="candidate",
                                          disable=not progress):
        x = acts[(point, pool)]
        oof = np.zeros(len(y))
        for train, held in folds:
            oof[held] = _fit(kind, config, spec.seed, x[train], y[train]).decision_function(x[held])
        table.append({"hook_point": str(point), "kind": kind, "config": config, "pool": pool,
                      "cv_auroc": float(roc_auc_score(y, oof))})
    # Highest out-of-fold AUROC; ties go to the shallower hook point (cheaper early stop).
    best = dict(max(table, key=lambda r: (round(r["cv_auroc"], 4), -HookPoint.parse(r["hook_point"]).layer)))
    x = acts[(runner.hooks.resolve(best["hook_point"]), best["pool"])]
    fit = lambda idx: _fit(best["kind"], best["config"], spec.seed, x[idx], y[idx], sae)  # noqa: E731
    best |= {"probe": fit(np.arange(len(y))), "fold_probes": [fit(train) for train, _ in folds], "folds": folds}
    return best, table


def bank_scores(runner: ModelRunner, packs: list[ProbePack], examples: list[Example], *, batch_size: int = 16,
                progress: bool = False) -> np.ndarray:
    """Aggregate probabilities [examples, packs] from one detector bank holding every pack."""
    if not examples:
        return np.zeros((0, len(packs)))
    bank = DetectorBank([Detector.from_pack(p) for p in packs], device=runner.device)
    items = encode_all(runner, examples, chat=packs[0].manifest.input_format == "chat")
    return np.array([r.probs for r in runner.score(items, bank, batch_size=batch_size, progress=progress)])


def score_sets(runner: ModelRunner, pack: ProbePack, sets: dict[str, list[Example]], *, batch_size: int = 16,
               progress: bool = False) -> dict[str, np.ndarray]:
    """Aggregate probability per example for each named set, through the detector bank.

    Sets overlap (a combined test set and its parts), so each distinct input is scored once.
    """
    index: dict[tuple, int] = {}
    for examples in sets.values():
        for e in examples:
            index.setdefault(e.scoring_key, len(index))
    unique = [Example(text=t, messages=m, score_suffix=sfx) for t, m, sfx in index]
    scores = bank_scores(runner, [pack], unique, batch_size=batch_size, progress=progress)[:, 0]
    return {name: scores[[index[e.scoring_key] for e in examples]].reshape(-1) for name, examples in sets.items()}


def held_out_fold(dev: list[Example], folds) -> dict[tuple, int]:
    """Scoring key of each `dev` row -> index of the fold that holds it out."""
    fold_of: dict[tuple, int] = {}
    for k, (_, held) in enumerate(folds):
        for i in held:
            fold_of.setdefault(dev[i].scoring_key, k)
    return fold_of


def out_of_fold_scores(runner: ModelRunner, pack: ProbePack, fold_probes: list, fold_of: dict[tuple, int],
                       examples: list[Example], *, batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Scores for `examples`: training rows (keys in `fold_of`) by the fold model that held them
    out, all others by `pack`."""
    m = pack.manifest
    packs = [pack] + [ProbePack(m.model_copy(update={"id": f"{m.id}-fold{k}"}), p) for k, p in enumerate(fold_probes)]
    scores = bank_scores(runner, packs, examples, batch_size=batch_size, progress=progress)
    column = [1 + fold_of.get(e.scoring_key, -1) for e in examples]
    return scores[np.arange(len(examples)), column]


def evaluate_sets(runner: ModelRunner, pack: ProbePack, sets: dict[str, list[Example]], *, batch_size: int = 16,
                  progress: bool = False) -> dict[str, dict[str, float]]:
    """Metrics per named set at the pack's threshold (sets with one label report rates only)."""
    scores = score_sets(runner, pack, sets, batch_size=batch_size, progress=progress)
    return {name: binary_metrics(_labels(sets[name]), scores[name], pack.manifest.threshold) for name in sets}


def train_pack(runner: ModelRunner, data: TrainData, spec: TrainSpec, *, progress: bool = True):
    """Sweep, fit, calibrate on the named benign set, evaluate held-out sets; returns (pack, sweep table).

    Calibration rows that are part of `dev` are scored out of fold, so the threshold never rests on
    scores of examples the shipped probe was fitted on.
    """
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
        enabled_by_default=spec.enabled_by_default,
    )
    pack = ProbePack(manifest, probe)
    fold_of = held_out_fold(data.dev, best["folds"])
    cal = out_of_fold_scores(runner, pack, best["fold_probes"], fold_of, data.calibration,
                             batch_size=spec.batch_size, progress=progress)
    threshold, achieved = threshold_at_fpr(cal, spec.target_fpr)
    manifest.threshold = threshold
    oof = sum(e.scoring_key in fold_of for e in data.calibration)
    manifest.calibration = Calibration(method="target_fpr_out_of_fold" if oof else "target_fpr",
                                       target_fpr=spec.target_fpr, benign_set=data.calibration_name,
                                       n_benign=len(data.calibration), achieved_fpr=achieved)
    manifest.metrics = evaluate_sets(runner, pack, data.eval_sets, batch_size=spec.batch_size, progress=progress)
    params = asdict(spec)
    manifest.provenance = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data_sha256": data_sha256(data.dev),
        "calibration_sha256": data_sha256(data.calibration),
        "git_commit": _git_commit(),
        "recipe": data.recipe,
        "params": params,
        "seed": spec.seed,
        "model_id": runner.model_id,
        "n_train": len(data.dev),
        "n_calibration_out_of_fold": oof,
        "selection": {
            "rule": f"highest {spec.folds}-fold grouped cross-validated AUROC (out-of-fold scores); ties to the "
                    "shallower hook point; the winner is refitted on all training rows",
            "chosen": {k: best[k] for k in ("hook_point", "kind", "config", "pool", "cv_auroc")},
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
