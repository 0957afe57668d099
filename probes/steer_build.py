"""Derive a steering vector from contrasting examples, on the activations serving sees.

Activations come from `ModelRunner.capture` (same chat template, hooks and hook points as serving),
pooled at the last prompt token (CAA reads the token the answer starts from; with the chat template
that is the assistant header) or over the scored tokens. Three methods:

* ``diff_means`` (CAA): mean of the positives minus mean of the negatives;
* ``pca`` (RepE): first principal direction of the positive-minus-negative differences, rows paired
  by line when both files are as long (RepE's and repeng's contrast pairs), else of both classes
  centred on the midpoint of their means. Uncentred on purpose: centring the differences (as
  repeng's sklearn PCA does) would subtract the very mean difference the direction is after;
* ``probe``: a linear probe pack's weight direction, as the detector bank reads it.

Every vector is scaled to the class separation along its own direction (diff_means is that
already) and oriented so the positives project higher, so coefficient 1 means the same shift for
every method and the sign never depends on an eigensolver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.runner import Encoded, ModelRunner
from probes.pack import ProbePack
from probes.train import _git_commit
from probes.vectors import DataFile, Provenance, VectorPack

POOLS = ("last", "mean")
BUILD_METHODS = ("diff_means", "pca", "probe")


def build_vector(
    runner: ModelRunner,
    positives: Sequence[Encoded],
    negatives: Sequence[Encoded],
    hook_points: Sequence[HookPoint | str],
    *,
    pack_id: str,
    method: Literal["diff_means", "pca", "probe"] = "diff_means",
    pool: Literal["last", "mean"] = "last",
    probe: ProbePack | None = None,
    data: Sequence[DataFile] = (),
    input_format: Literal["chat", "raw"] = "chat",
    default_coefficient: float = 1.0,
    kind: Literal["add", "ablate"] = "add",
    description: str = "",
    batch_size: int = 16,
    progress: bool = False,
) -> VectorPack:
    """A pack (not yet saved) with one vector per hook point; `data` names the files the examples came
    from, for provenance."""
    points = sorted({p if isinstance(p, HookPoint) else HookPoint.parse(p) for p in hook_points})
    if method not in BUILD_METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(BUILD_METHODS)}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}: use one of {', '.join(POOLS)}")
    if not positives or not negatives:
        raise ValueError("a steering vector needs at least one positive and one negative example")
    if not points:
        raise ValueError("give at least one hook point")
    if (method == "probe") != (probe is not None):
        raise ValueError("the probe method takes a probe pack, and only it does")
    weight = _probe_direction(probe, points) if probe is not None else None
    acts = runner.capture([*positives, *negatives], points, batch_size=batch_size, progress=progress)
    n = len(positives)
    directions, stats = {}, {}
    for p in points:
        x = torch.from_numpy(acts[(p, pool)]).double()
        pos, neg = x[:n], x[n:]
        delta = pos.mean(0) - neg.mean(0)
        if method == "diff_means":
            v = delta
        else:
            u = _principal_direction(pos, neg) if method == "pca" else weight
            v = u * (delta @ u)  # the class separation along u, pointing at the positives
        stats[p] = {
            "separation": _separation(pos, neg, v),
            "cosine_diff_means": None if method == "diff_means" else _cosine(v, delta),
        }
        directions[p] = v.float()
    params = {
        "method": method,
        "pool": pool,
        "input_format": input_format,
        "n_positive": n,
        "n_negative": len(negatives),
        "batch_size": batch_size,
        "model_id": runner.model_id,
    }
    sources = list(data)
    if method == "pca":
        params["pca"] = "paired" if len(positives) == len(negatives) else "centred"
    if probe is not None:
        m = probe.manifest
        params["probe"] = {"id": m.id, "version": m.version, "kind": m.kind, "hook_point": m.hook_point}
        sources.append(DataFile(role="source", path=f"probe pack {m.id}", sha256=m.weights_sha256))
    fp = runner.fingerprint
    return VectorPack.create(
        pack_id,
        directions,
        method=method,
        stats=stats,
        model=fp,
        model_hint=fp.model_type,
        default_coefficient=default_coefficient,
        kind=kind,
        description=description,
        provenance=Provenance(data=sources, commit=_git_commit(), params=params),
    )


def _probe_direction(probe: ProbePack, points: list[HookPoint]) -> torch.Tensor:
    """The probe's unit weight vector; a probe that reads several directions has no single one."""
    at = HookPoint.parse(probe.manifest.hook_point)
    if points != [at]:
        raise ValueError(f"probe {probe.manifest.id!r} reads {at}: build its vector there (hook point {at})")
    w = DetectorBank([Detector.from_pack(probe)]).directions(0)
    if w.shape[1] != 1:
        raise ValueError(
            f"probe {probe.manifest.id!r} ({probe.manifest.kind}) reads {w.shape[1]} directions; "
            "the probe method needs a linear probe (logistic, diff_means, lat)"
        )
    w = w[:, 0].double()
    if not w.norm() > 0:
        raise ValueError(f"probe {probe.manifest.id!r} has a zero weight vector")
    return w / w.norm()


def _principal_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    if len(pos) == len(neg):
        rows = pos - neg
    else:
        mid = (pos.mean(0) + neg.mean(0)) / 2
        rows = torch.cat([pos - mid, neg - mid])
    return torch.linalg.svd(rows, full_matrices=False).Vh[0]


def _separation(pos: torch.Tensor, neg: torch.Tensor, v: torch.Tensor) -> float | None:
    """Cohen's d of the two classes' projections on v: how cleanly this hook point tells them apart."""
    if not v.norm() > 0:
        return None
    u = v / v.norm()
    a, b = pos @ u, neg @ u
    spread = ((a.var(unbiased=False) + b.var(unbiased=False)) / 2).sqrt()
    return float((a.mean() - b.mean()) / spread) if spread > 0 else None


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 0 else None


__all__ = ["BUILD_METHODS", "POOLS", "build_vector"]
