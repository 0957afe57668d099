"""How much lie/truth signal does a model carry on LieDetector Q/A at all?

The shipped deception recipe trains on instructed pairs and tests on LieDetector. When that
transfer is at chance, this script tells apart "the recipe does not transfer" from "the model
does not represent it": it fits a probe *on LieDetector itself* (grouped 5-fold cross-validation
by question, so no question is on both sides) and prints the out-of-fold AUROC per layer. That is
a ceiling for any linear probe on the model, not a deployable detector.

    python scripts/deception_ceiling.py [--model ID] [--layers 8 14 18 24]
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from monitor.domain import HookPoint
from monitor.runner import ModelRunner, encode_all
from probes.kinds.logistic import LogisticConfig, LogisticProbe
from probes.recipes import deception_splits
from probes.train import dev_folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF id or local folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", type=float, nargs="*", default=[0.3, 0.5, 0.6, 0.8],
                    help="blocks to probe; values below 1 are fractions of the model's depth")
    ap.add_argument("--n", type=int, default=1000, help="LieDetector rows to use (paired by question)")
    args = ap.parse_args()

    runner = ModelRunner.load(args.model)
    depth = runner.hooks.num_layers
    layers = sorted({round(v * depth) if v < 1 else int(v) for v in args.layers})
    qa = deception_splits(max_eval=args.n).eval_sets["liedetector_qa"]
    y = np.array([e.label for e in qa])
    folds = dev_folds(qa, 5, seed=0)
    points = [HookPoint.parse(f"blocks.{i}.resid_post") for i in layers]
    acts = runner.capture(encode_all(runner, qa, chat=True), points, batch_size=16, progress=True)
    print(f"{runner.model_id}: {len(qa)} LieDetector answers ({int(y.sum())} lies), 5-fold CV grouped by question")
    for point in points:
        row = []
        for pool in ("mean", "last"):
            x, oof = acts[(point, pool)], np.zeros(len(y))
            for train, held in folds:
                probe = LogisticProbe(LogisticConfig(C=0.01))
                probe.fit(x[train], y[train])
                oof[held] = probe.decision_function(x[held])
            row.append(f"{pool} {roc_auc_score(y, oof):.3f}")
        print(f"  {point}: out-of-fold AUROC " + ", ".join(row))


if __name__ == "__main__":
    main()
