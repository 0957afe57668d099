"""Detection metrics, always from scikit-learn, always on scores from the served scoring path."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Best recall whose false-positive rate on the negatives stays at or below `fpr`."""
    fprs, tprs, _ = roc_curve(y, scores)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def binary_metrics(y, scores, threshold: float | None = None) -> dict[str, float]:
    """AUROC, AUPRC and recall at 1% / 0.1% FPR; with a threshold, the rates it gives."""
    y, scores = np.asarray(y, dtype=int), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    out: dict[str, float] = {"n_pos": n_pos, "n_neg": n_neg}
    if n_pos and n_neg:
        out |= {
            "auroc": float(roc_auc_score(y, scores)),
            "auprc": float(average_precision_score(y, scores)),
            "recall_at_1pct_fpr": recall_at_fpr(y, scores, 0.01),
            "recall_at_0.1pct_fpr": recall_at_fpr(y, scores, 0.001),
        }
    if threshold is not None:
        flagged = scores >= threshold
        if n_pos:
            out["recall_at_threshold"] = float(flagged[y == 1].mean())
        if n_neg:
            out["fpr_at_threshold"] = float(flagged[y == 0].mean())
    return out


def threshold_at_fpr(benign_scores, target_fpr: float) -> tuple[float, float]:
    """Lowest threshold (flag when score >= t) that flags at most `target_fpr` of benign scores.

    Returns (threshold, achieved FPR on those scores).
    """
    s = np.sort(np.asarray(benign_scores, dtype=float))[::-1]
    if s.size == 0:
        raise ValueError("cannot calibrate a threshold on an empty benign set")
    allowed = int(np.floor(target_fpr * s.size))
    t = float(np.nextafter(s[allowed], np.inf)) if allowed < s.size else float(s[-1])
    t = min(t, 1.0)
    return t, float((s >= t).mean())
