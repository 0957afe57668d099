"""Alert explanations: the tokens that drove a detector's score, and the SAE latents active where it fired.

The latents are read on the device, inside the forward hook (`bank.LatentReadout`), and cross
to the host with the step's one transfer. The tokens need no device work: every token's
detector scores cross anyway (Score: all of them; Generate: the prompt's with the prefill, then
one token per step), so they are ranked here, on the host, only when a rule fires. The result
is what an AlertRecord stores as its `explanation`, within the bounds of `monitor.domain`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from monitor.bank import DetectorBank
from monitor.domain import EXPLAIN_MAX_LATENTS, EXPLAIN_MAX_TEXT

log = logging.getLogger(__name__)


def explanation(bank: DetectorBank, slot: int, scores: np.ndarray | None, first: int, text: Callable[[int], str],
                latents: np.ndarray | None) -> dict[str, Any] | None:
    """`_explanation`, or None if building it fails: an explanation is an extra on the alert it
    explains, and must never cost the alert its record."""
    try:
        return _explanation(bank, slot, scores, first, text, latents)
    except Exception:
        log.exception("alert explanation for detector slot %d failed; the alert is recorded without one", slot)
        return None


def _explanation(bank: DetectorBank, slot: int, scores: np.ndarray | None, first: int, text: Callable[[int], str],
                 latents: np.ndarray | None) -> dict[str, Any] | None:
    """Detector `slot`'s explanation, or None when there is nothing to say.

    `scores` [tokens, detectors] are the probabilities of the tokens scored so far, token j at
    position `first + j`: the `bank.explain_tokens` highest of the detector's are listed, with
    `text(position)`; equal scores list the earlier token first (as the argmax that places a
    Score alert), and a NaN counts as 1.0 (as `decisions.decide` counts it). `latents` is the
    readout [pairs, m, 2] at the token where the alert fired.
    """
    tokens = []
    if bank.explain_tokens and scores is not None:
        p = np.nan_to_num(scores[:, slot], nan=1.0)
        for j in np.argsort(-p, kind="stable")[: bank.explain_tokens]:
            position = first + int(j)
            tokens.append({"position": position, "text": text(position)[:EXPLAIN_MAX_TEXT], "score": float(p[j])})
    found = []
    if bank.readout is not None and latents is not None:
        found = bank.readout.of(slot, latents)[:EXPLAIN_MAX_LATENTS]
    if not (tokens or found):
        return None
    return {"tokens": tokens,
            "latents": [{"sae_id": sae_id, "latent": i, "activation": a} for sae_id, i, a in found]}
