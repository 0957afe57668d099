"""Train, select, calibrate and evaluate a probe pack through the serving path.

Activations are collected with the same `ModelRunner`, chat formatting and hook points the server
uses, so there is no train/serve skew. Thresholds and metrics are computed from scores produced
by the detector bank itself (`runner.score`), i.e. exactly the numbers a deployment will see.

Selection and calibration use K-fold cross-validation over the development data (grouped, so a
behaviour never sits on both sides of a fold): every candidate is ranked by its out-of-fold AUROC,
the winner is refitted on all of the data, and benign calibration rows that were trained on are
scored by the fold model that did not see them. All labelled data trains the shipped probe, and
the threshold still comes from scores on unseen rows.

With `selection="loso"` candidates are ranked by leave-one-source-out scores instead
(`probes.loso`: each source held out in turn), the pooled k-fold AUROC still reported beside
them; `aggregations` then picks how the winner aggregates tokens when served, by scoring every
training row through one detector bank that holds each held-out-source model under each
candidate aggregation.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

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
from probes.loso import held_out_scores, unit_folds, unit_metrics
from probes.pack import Aggregation, Calibration, Manifest, Platt, ProbePack


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
    # "cv": rank by pooled k-fold AUROC; "loso": by leave-one-source-out AUROC, then recall at 1% FPR
    selection: Literal["cv", "loso"] = "cv"
    # serving aggregations to choose from through the bank (with selection="loso"); None: the pool
    aggregations: list[dict] | None = None
    description: str = ""
    enabled_by_default: bool = True
    reads: str = "both"  # monitor.domain.RuleWhere: what rules read by default (Manifest.reads)


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
    units = unit_folds(data.dev) if spec.selection == "loso" else None
    items = encode_all(runner, data.dev, chat=spec.input_format == "chat")
    acts = runner.capture(items, points, batch_size=spec.batch_size, progress=progress,
                          encode=None if sae is None else sae.to(runner.device).encode)
    table, by_unit = [], {}
    for point, kind, config, pool in tqdm(candidates, desc=f"{spec.folds}-fold cross-validation", unit="candidate",
                                          disable=not progress):
        x = acts[(point, pool)]
        oof = np.zeros(len(y))
        for train, held in folds:
            oof[held] = _fit(kind, config, spec.seed, x[train], y[train]).decision_function(x[held])
        row = {"hook_point": str(point), "kind": kind, "config": config, "pool": pool,
               "cv_auroc": float(roc_auc_score(y, oof))}
        if units is not None:
            def scorer(train, x=x, kind=kind, config=config):
                probe = _fit(kind, config, spec.seed, x[train], y[train])
                return lambda held: probe.decision_function(x[held])

            loso = unit_metrics(data.dev, units, held_out_scores(units, scorer, len(y)))
            row |= {f"loso_{k}": v for k, v in loso.items() if k != "units"}
            by_unit[len(table)] = loso
        table.append(row)
    if units is None:  # highest out-of-fold AUROC; ties go to the shallower hook point (cheaper early stop)
        rank = lambda r: (round(r["cv_auroc"], 4), -HookPoint.parse(r["hook_point"]).layer)  # noqa: E731
    else:  # a source never seen, then the rate at a strict threshold, then depth
        rank = lambda r: (round(r["loso_auroc"], 4), round(r["loso_recall_at_1pct_fpr"], 4),  # noqa: E731
                          -HookPoint.parse(r["hook_point"]).layer)
    pick = max(range(len(table)), key=lambda i: rank(table[i]))
    best = dict(table[pick])
    x = acts[(runner.hooks.resolve(best["hook_point"]), best["pool"])]
    fit = lambda idx: _fit(best["kind"], best["config"], spec.seed, x[idx], y[idx], sae)  # noqa: E731
    best |= {"probe": fit(np.arange(len(y))), "fold_probes": [fit(train) for train, _ in folds], "folds": folds}
    if units is not None:
        best |= {"loso": by_unit[pick], "units": units, "unit_probes": [fit(train) for _, train, _ in units]}
    return best, table


def choose_aggregation(runner: ModelRunner, pack: ProbePack, data: TrainData, spec: TrainSpec, best: dict, *,
                       progress: bool = False) -> tuple[Aggregation, list[dict], np.ndarray]:
    """Score every training row through one bank that holds each held-out-source model under each of
    `spec.aggregations`, read each row from the model that never saw its source, and keep the
    aggregation with the best leave-one-source-out numbers (ties: the earlier in the list).
    Returns it, the comparison table, and the rows' held-out scores under it."""
    m, units = pack.manifest, best["units"]
    aggs = [Aggregation(**a) for a in spec.aggregations]
    packs = [ProbePack(m.model_copy(update={"id": f"{m.id}-a{a}-u{k}", "aggregation": agg}), probe)
             for a, agg in enumerate(aggs) for k, probe in enumerate(best["unit_probes"])]
    scores = bank_scores(runner, packs, data.dev, batch_size=spec.batch_size, progress=progress)
    unit_of = np.empty(len(data.dev), dtype=int)
    for k, (_, _, held) in enumerate(units):
        unit_of[held] = k
    table, cols = [], []
    for a, agg in enumerate(aggs):
        cols.append(scores[np.arange(len(data.dev)), a * len(units) + unit_of])
        loso = unit_metrics(data.dev, units, cols[-1])
        table.append({"aggregation": agg.model_dump(exclude_none=True), "loso": loso,
                      **{f"loso_{k}": v for k, v in loso.items() if k != "units"}})
    pick = max(range(len(aggs)), key=lambda i: (round(table[i]["loso_auroc"], 4),
                                                 round(table[i]["loso_recall_at_1pct_fpr"], 4), -i))
    return aggs[pick], table, cols[pick]


def fit_platt(probs: np.ndarray, y: np.ndarray, fitted_on: str) -> Platt:
    """sigmoid(a * logit + b) fitted to held-out scores (per-token logits aggregated by a window
    saturate the probabilities a pooled fit would give; this puts them back on a readable scale).
    Probabilities are clipped to float32's resolution before taking logits."""
    from sklearn.linear_model import LogisticRegression

    eps = float(np.finfo(np.float32).eps)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    z = np.log(p / (1 - p))[:, None]
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
    return Platt(a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]), fitted_on=fitted_on, n=len(y))


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
        reads=spec.reads,
    )
    pack = ProbePack(manifest, probe)
    aggregation_table = None
    if spec.aggregations and "units" in best:
        manifest.aggregation, aggregation_table, held_out = choose_aggregation(runner, pack, data, spec, best,
                                                                               progress=progress)
        best["loso"] = next(r["loso"] for r in aggregation_table
                            if r["aggregation"] == manifest.aggregation.model_dump(exclude_none=True))
        manifest.platt = fit_platt(held_out, _labels(data.dev), "training rows, each source held out")
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
    if "loso" in best:  # a source never seen: in the manifest beside the held-out sets
        loso = best["loso"]
        manifest.metrics["loso"] = {k: v for k, v in loso.items() if k != "units"}
        manifest.metrics |= {f"loso/{name}": m for name, m in loso["units"].items()}
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
            "rule": (f"highest {spec.folds}-fold grouped cross-validated AUROC (out-of-fold scores); ties to the "
                     "shallower hook point; the winner is refitted on all training rows") if spec.selection == "cv"
            else ("highest leave-one-source-out AUROC (each source and label held out with its groups), then "
                  "recall at 1% FPR, then the shallower hook point; the winner is refitted on all training rows"),
            "chosen": {k: v for k, v in best.items() if k in table[0]},
            "sweep": table,
            **({"aggregations": [{k: v for k, v in r.items() if k != "loso"} for r in aggregation_table]}
               if aggregation_table else {}),
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
