"""The detector bank: every probe on every token, inside the forward pass, on the model's device.

Detectors that read the same hook point are fused per scorer kind (`monitor.scorers`): all
affine probes at a hook point cost one matmul however many there are; MLP probes add two.
Per-token logits land in a step buffer; `BankState.update` folds them into per-row running
aggregates (last, mean, max, EMA, rolling max, max of rolling means) with padding masked out. For alert explanations,
`LatentReadout` reads the most active latents of each SAE at a detector's hook point in the same
hook. Nothing here leaves the device: the runner moves one tensor to the host per forward step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from monitor.domain import AGGREGATIONS, WINDOWED_AGGREGATIONS, HookPoint
from monitor.scorers import scorer_for

if TYPE_CHECKING:
    from monitor.sae import SAE


@dataclass
class Detector:
    """One loaded probe as the bank sees it."""

    id: str
    version: str
    hook_point: HookPoint
    head: object  # anything with a registered `scorer_kind` (monitor.scorers)
    aggregation: str = "mean"
    alpha: float | None = None  # ema
    window: int | None = None  # rolling_max, max_rolling_mean
    threshold: float = 0.5
    input_format: str = "chat"  # how plain text is encoded for this probe: as a user turn, or raw
    manifest: object | None = field(default=None, repr=False)
    # "completion": aggregates generated tokens only (a policy rule's `where: completion` reads a
    # copy of its detector under this scope); prompt tokens never enter its statistics.
    scope: Literal["all", "completion"] = "all"

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"detector {self.id!r}: unknown aggregation {self.aggregation!r}")
        if self.aggregation == "ema" and not (self.alpha and 0 < self.alpha <= 1):
            raise ValueError(f"detector {self.id!r}: ema aggregation needs 0 < alpha <= 1")
        if self.aggregation in WINDOWED_AGGREGATIONS and not (self.window and self.window >= 1):
            raise ValueError(f"detector {self.id!r}: {self.aggregation} aggregation needs window >= 1")

    @classmethod
    def from_pack(cls, pack) -> Detector:
        m = pack.manifest
        return cls(
            id=m.id,
            version=m.version,
            hook_point=HookPoint.parse(m.hook_point),
            head=pack.head(),
            aggregation=m.aggregation.kind,
            alpha=m.aggregation.alpha,
            window=m.aggregation.window,
            threshold=m.threshold,
            input_format=m.input_format,
            manifest=m,
        )


class HookGroup:
    """Every detector that reads one hook point: one scorer per scorer kind present there."""

    def __init__(self, point: HookPoint, heads: list, slots: list[int], device, dtype):
        self.point = point
        by_kind: dict[type, list[int]] = {}
        for i, head in enumerate(heads):
            by_kind.setdefault(scorer_for(head), []).append(i)
        self.scorers = [
            (cls([heads[i] for i in idx], device, dtype), torch.tensor([slots[i] for i in idx], device=device))
            for cls, idx in by_kind.items()
        ]

    def record(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """Score [batch, seq, d_model] into `out` [batch, seq, detectors] at each head's slot."""
        flat = h.reshape(-1, h.shape[-1])
        for scorer, slots in self.scorers:
            out.index_copy_(2, slots, scorer.logits(flat).view(*h.shape[:-1], -1))


class LatentReadout:
    """The `m` most active latents of each SAE at a detector's hook point, read on the device.

    One entry per (detector slot, SAE id) pair whose hook points are equal (`pairs`); a step fills
    [rows, pairs, m, 2] with (latent, activation), highest first. A detector with no SAE at its
    hook point has no pair, so a bank without any has no readout and its hooks do no extra work.
    """

    def __init__(self, points: Sequence[HookPoint], saes: Mapping[str, SAE], m: int, device):
        self.m = m
        self.pairs: list[tuple[int, str]] = []
        self.slots: dict[HookPoint, torch.Tensor] = {}  # the detectors at each such point, in slot order
        self.at: dict[HookPoint, list[tuple[SAE, torch.Tensor]]] = {}  # its SAEs, and the pairs each fills
        for sae_id, sae in saes.items():
            slots = [s for s, p in enumerate(points) if p == sae.hook_point]
            if slots:
                pairs = torch.arange(len(self.pairs), len(self.pairs) + len(slots), device=device)
                self.pairs += [(s, sae_id) for s in slots]
                self.slots[sae.hook_point] = torch.tensor(slots, device=device)
                self.at.setdefault(sae.hook_point, []).append((sae, pairs))

    def read(self, point: HookPoint, h: torch.Tensor, out: torch.Tensor) -> None:
        """Top latents of h [rows, d] (one token per row, for every detector at `point`) or [rows, k, d]
        (one token per detector there, in `slots` order), written into `out` [rows, pairs, m, 2].
        One full encode per SAE and token, then top-k: no host sync."""
        for sae, pairs in self.at[point]:
            act, idx = sae.encode(h).topk(min(self.m, sae.d_sae), dim=-1)
            top = torch.stack([idx.to(out.dtype), act.to(out.dtype)], -1)
            if top.dim() == 3:  # the same token for every detector at the point
                top = top[:, None].expand(-1, len(pairs), -1, -1)
            out.index_copy_(1, pairs, torch.nn.functional.pad(top, (0, 0, 0, self.m - top.shape[2])))

    def of(self, slot: int, latents: np.ndarray) -> list[tuple[str, int, float]]:
        """Host side: (SAE id, latent, activation) of detector `slot`'s active latents in one row's
        [pairs, m, 2]; inactive (0) and non-finite activations are left out."""
        return [(sae_id, int(i), float(a)) for (s, sae_id), top in zip(self.pairs, latents) if s == slot
                for i, a in top if 0 < a < np.inf]


class DetectorBank:
    """A fixed set of detectors, fused per hook point. Immutable: reload builds a new bank.

    `explain_tokens` and `explain_latents` size alert explanations (monitor.explain): how many top
    tokens an alert lists, and how many latents of each SAE in `saes` (by id) at its hook point.
    """

    def __init__(self, detectors: list[Detector], *, device="cpu", dtype=torch.float32,
                 saes: Mapping[str, SAE] | None = None, explain_tokens: int = 0, explain_latents: int = 0):
        ids = [d.id for d in detectors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate detector ids in bank: {sorted(ids)}")
        formats = {d.input_format for d in detectors}
        if len(formats) > 1:
            raise ValueError(
                "these detectors expect plain text encoded differently (chat turn vs raw text): "
                + ", ".join(f"{d.id}={d.input_format}" for d in detectors)
                + "; load them in separate servers or retrain one of them"
            )
        self.input_format = formats.pop() if formats else "chat"
        self.detectors = list(detectors)
        self.device = torch.device(device)
        by_point: dict[HookPoint, list[int]] = {}
        for slot, det in enumerate(detectors):
            by_point.setdefault(det.hook_point, []).append(slot)
        self.groups = {
            point: HookGroup(point, [detectors[s].head for s in slots], slots, self.device, dtype)
            for point, slots in sorted(by_point.items())
        }
        p = len(detectors)
        self.kinds = [k for k in AGGREGATIONS if any(d.aggregation == k for d in detectors)]
        self.agg_code = torch.tensor([self.kinds.index(d.aggregation) for d in detectors], device=self.device,
                                     dtype=torch.long)
        self.alpha = torch.tensor([d.alpha or 1.0 for d in detectors], device=self.device)
        windows = [d.window or 1 for d in detectors]
        self.max_window = max(windows, default=1)
        self.window = torch.tensor(windows, device=self.device, dtype=torch.float32)
        # window_mask[k, p]: whether the k-th most recent token is inside probe p's window
        self.window_mask = torch.arange(self.max_window, device=self.device)[:, None] < torch.tensor(
            windows, device=self.device
        )
        self.thresholds = torch.tensor([d.threshold for d in detectors], device=self.device)
        # [probes] True where prompt tokens are left out; None when every probe reads the prompt
        completion = [d.scope == "completion" for d in detectors]
        self.completion_only = torch.tensor(completion, device=self.device) if any(completion) else None
        self.size = p
        self.explain_tokens = explain_tokens
        self.readout: LatentReadout | None = None
        if explain_latents:
            readout = LatentReadout([d.hook_point for d in detectors], saes or {}, explain_latents, self.device)
            self.readout = readout if readout.pairs else None

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.detectors]

    @property
    def hook_points(self) -> list[HookPoint]:
        return list(self.groups)

    def directions(self, slot: int) -> torch.Tensor:
        """[d_model, k] directions detector `slot` reads, for spotting steering that would blind it."""
        head = self.detectors[slot].head
        return scorer_for(head).directions(head)

    @property
    def deepest(self) -> HookPoint | None:
        return max(self.groups, default=None)

    def state(self, rows: int) -> BankState:
        return BankState(self, rows)


class BankState:
    """Per-row running aggregates for one batch of requests, kept on the device."""

    def __init__(self, bank: DetectorBank, rows: int):
        self.bank = bank
        dev, p = bank.device, bank.size
        # scored tokens so far: one count per row, or per row and probe when some skip the prompt
        self.count = torch.zeros(rows, 1 if bank.completion_only is None else p, device=dev)
        self.sum = torch.zeros(rows, p, device=dev)
        self.max = torch.full((rows, p), -torch.inf, device=dev)
        self.last = torch.zeros(rows, p, device=dev)
        self.ema = torch.zeros(rows, p, device=dev)
        self.ema_decay = torch.ones(rows, p, device=dev)  # (1 - alpha) ** count, for bias correction
        self.recent = torch.full((rows, bank.max_window, p), -torch.inf, device=dev)  # most recent first
        self.window_max = torch.full((rows, p), -torch.inf, device=dev)  # max of full windows' means
        self.step_logits: torch.Tensor | None = None
        self.latents: torch.Tensor | None = None  # [rows, pairs, m, 2] of this step, with a bank.readout
        self.held: dict[HookPoint, torch.Tensor] | None = None

    def begin_step(self, rows: int, seq: int, *, hold: bool = False) -> None:
        """`hold` keeps the activations at the readout's hook points for `read_latents` after the pass
        (Score: the token an alert is attached to is known only once every token is scored); else
        latents are read in the hook at the step's last token, the one a decode step reads."""
        self.step_logits = torch.zeros(rows, seq, self.bank.size, device=self.bank.device)
        readout = self.bank.readout
        if readout is not None:
            self.latents = torch.zeros(rows, len(readout.pairs), readout.m, 2, device=self.bank.device)
            self.held = {} if hold else None

    def record(self, point: HookPoint, h: torch.Tensor) -> None:
        """Called from the forward hook: score this hook point's detectors on every token."""
        group = self.bank.groups.get(point)
        if group is not None:
            group.record(h, self.step_logits)
        readout = self.bank.readout
        if readout is not None and point in readout.at:
            if self.held is not None:
                self.held[point] = h
            else:
                readout.read(point, h[:, -1], self.latents)

    def read_latents(self, probs: torch.Tensor, scored: torch.Tensor) -> None:
        """Read the held activations at each detector's highest-scoring token: the first of equal
        ones among `scored` [rows, seq], as an argmax over the same `probs` [rows, seq, detectors]
        on the host finds it."""
        readout = self.bank.readout
        peak = torch.where(scored[..., None], probs, -1.0).argmax(1)  # [rows, detectors]
        for point, h in self.held.items():
            cols = peak[:, readout.slots[point]]
            readout.read(point, h.gather(1, cols[..., None].expand(-1, -1, h.shape[-1])), self.latents)
        self.held = {}

    def update(self, mask: torch.Tensor, *, prompt: bool = False) -> torch.Tensor:
        """Fold the step's logits into the aggregates; `mask` [rows, seq] marks scored tokens, and
        `prompt` says they are prompt tokens (completion-scoped probes then skip them).

        Only the statistics some loaded detector aggregates with are kept up to date: this runs
        once per generated token, so a bank of mean-aggregated probes pays for a sum and a count.
        Returns the aggregate logits [rows, probes] after this step.
        """
        x, kinds = self.step_logits, self.bank.kinds
        mf = mask.bool()[..., None]  # [rows, seq, 1], or [rows, seq, probes] with per-probe scopes
        if prompt and self.bank.completion_only is not None:
            mf = mf & ~self.bank.completion_only
        n = mf.sum(1).float()  # [rows, 1 or probes]
        if "max_rolling_mean" in kinds:  # before `count` and `recent` move on: it reads both
            self._window_means(x, mf)
        self.count += n
        if "mean" in kinds or "max_rolling_mean" in kinds:
            self.sum += torch.where(mf, x, 0.0).sum(1)
        if "max" in kinds:
            self.max = torch.maximum(self.max, torch.where(mf, x, -torch.inf).amax(1))
        if "last" in kinds:
            pos = torch.arange(x.shape[1], device=x.device)[None, :, None]
            last_idx = torch.where(mf, pos, -1).amax(1).clamp(min=0).expand(-1, x.shape[2])  # [rows, probes]
            self.last = torch.where(n > 0, x.gather(1, last_idx[:, None, :]).squeeze(1), self.last)
        if "ema" in kinds or "rolling_max" in kinds or "max_rolling_mean" in kinds:
            # rank of each scored token counted from the end of the step (0 = most recent)
            after = (mf.flip(1).cumsum(1).flip(1) - mf.long()).float()  # [rows, seq, 1 or probes]
        if "ema" in kinds:
            keep = 1.0 - self.bank.alpha  # [probes]
            weight = self.bank.alpha * keep.pow(after)  # [rows, seq, probes]
            self.ema = self.ema * keep.pow(n) + torch.where(mf, weight * x, 0.0).sum(1)
            self.ema_decay = self.ema_decay * keep.pow(n)
        if "rolling_max" in kinds or "max_rolling_mean" in kinds:
            w = self.bank.max_window
            k = torch.arange(w, device=x.device)
            # Scatter each scored token to its recency slot; everything else lands in a spare slot
            # w that is dropped (no boolean indexing: that would sync with the host on CUDA).
            slot = torch.where(mf & (after < w), after.long(), w).expand_as(x)
            new = torch.full((x.shape[0], w + 1, x.shape[2]), -torch.inf, device=x.device)
            new = new.scatter(1, slot, x)[:, :w]
            shift = (k[None, :, None] - n[:, None, :]).long()  # [rows, w, 1 or probes]: where old entry k comes from
            old = self.recent.gather(1, shift.clamp(min=0).expand_as(self.recent))
            self.recent = torch.where(shift >= 0, old, new)
        return self.aggregate()

    def _window_means(self, x: torch.Tensor, mf: torch.Tensor) -> None:
        """Fold into `window_max` the mean of every full window (each probe's last `window` scored
        tokens) that ends at one of this step's tokens. Prefix sums over the tokens the ring still
        holds followed by this step's, indexed by how many scored tokens precede: no host sync."""
        old = self.recent.flip(1)  # [rows, max_window, probes], oldest first; -inf where empty
        old_ok, new_ok = torch.isfinite(old), mf.expand_as(x)
        ok = torch.cat([old_ok, new_ok], 1)
        sums = torch.where(ok, torch.cat([old, x], 1), 0.0).cumsum(1)
        seen = ok.float().cumsum(1)  # scored tokens up to each position
        by_seen = torch.zeros(sums.shape[0], sums.shape[1] + 1, sums.shape[2], device=x.device)
        by_seen = by_seen.scatter(1, torch.where(ok, seen, 0.0).long(), torch.where(ok, sums, 0.0))
        window = self.bank.window
        start = (seen - window).clamp(min=0).long()
        means = (sums - by_seen.gather(1, start)) / window
        # a window is full once `window` tokens have been scored in all (the ring may hold fewer)
        total = self.count[:, None, :] + new_ok.float().cumsum(1)
        full = new_ok & (total >= window)
        step = torch.where(full, means[:, old.shape[1]:], -torch.inf).amax(1)
        self.window_max = torch.maximum(self.window_max, step)

    def aggregate(self) -> torch.Tensor:
        """Aggregate logit per row and probe under each probe's own aggregation."""
        stat = {
            "last": lambda: self.last,
            "mean": lambda: self.sum / self.count.clamp(min=1),
            "max": lambda: self.max,
            "ema": lambda: self.ema / (1.0 - self.ema_decay).clamp(min=1e-12),
            "rolling_max": lambda: torch.where(self.bank.window_mask, self.recent, -torch.inf).amax(1),
            # while fewer than `window` tokens have been scored, the mean of those there are
            "max_rolling_mean": lambda: torch.where(self.count >= self.bank.window, self.window_max,
                                                    self.sum / self.count.clamp(min=1)),
        }
        kinds = self.bank.kinds
        if len(kinds) == 1:
            out = stat[kinds[0]]()
        else:
            candidates = torch.stack([stat[k]() for k in kinds])  # [kinds, rows, probes]
            out = candidates.gather(0, self.bank.agg_code.expand(1, *self.sum.shape)).squeeze(0)
        return torch.where(self.count > 0, out, 0.0)

    STATS = ("count", "sum", "max", "last", "ema", "ema_decay", "recent", "window_max")

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch)."""
        for name in self.STATS:
            setattr(self, name, getattr(self, name).index_select(0, rows))

    def extend(self, other: BankState) -> None:
        """Append another batch's rows (requests joining a running generation)."""
        for name in self.STATS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
