"""Evaluation report: results table (CSV, JSON) and one self-contained HTML page.

The page must open offline and years later, so everything is inline: plots are base64 PNGs drawn
with matplotlib's Agg canvas, CSS sits in a <style> block, and there are no fonts, scripts or
images from anywhere else. `build_report_data` gathers the numbers from a model; `write_report`
only renders them, so the report can be tested (and re-rendered) without a model.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from probes.evaluate import binary_metrics

METRICS = ("auroc", "auprc", "recall_at_1pct_fpr", "recall_at_0.1pct_fpr", "recall_at_threshold", "fpr_at_threshold")
METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "recall_at_1pct_fpr": "Recall @1% FPR",
    "recall_at_0.1pct_fpr": "Recall @0.1% FPR",
    "recall_at_threshold": "Recall @thr",
    "fpr_at_threshold": "FPR @thr",
}
CSV_FIELDS = ("eval_set", "method", "n", "n_pos", "n_neg", *METRICS, "threshold")
HEAT_CMAP = colormaps["YlOrRd"]
DIVERGING_CMAP = colormaps["RdBu_r"]  # token scores around the threshold: blue, white at it, red
TIE = 0.005  # operating-point differences below this are reported as ties
# eval sets holding harmful requests inside jailbreak wrappers (names from probes.recipes)
WRAPPED = re.compile(r"^(jbb_artifacts/|dan_wrapped|future_tense)")
PALETTE = ("#1f4e99", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e")


# ------------------------------------------------------------------------------------ data


@dataclass
class MethodScores:
    """One detector's scores on every eval set and the threshold it ships with (None: uncalibrated)."""

    scores: dict[str, np.ndarray]
    threshold: float | None
    description: str = ""


@dataclass
class Heatmap:
    """One example's per-token scores; `context` is the unscored text shown before them."""

    title: str
    tokens: list[tuple[str, float]]
    context: str = ""


@dataclass
class ReportData:
    """Everything the report shows. `methods` is ordered; `primary` (the probe) is compared to the rest."""

    title: str
    labels: dict[str, np.ndarray]  # eval set -> 0/1 labels, shared by all methods
    methods: dict[str, MethodScores]
    primary: str = "probe"
    roc_set: str | None = None  # the combined harmful-vs-benign set; None pools every set
    sweep: list[dict[str, Any]] = field(default_factory=list)  # hook_point, kind, pool, cv_auroc
    chosen: dict[str, Any] | None = None  # the sweep row the pack ships (default: best cross-validated AUROC)
    heatmaps: list[Heatmap] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)  # pack summary shown as a table
    notes: list[str] = field(default_factory=list)
    # each source held out (probes.loso): method -> unit name -> metrics; "all (pooled)" first
    loso: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # serving aggregations compared on held-out sources: aggregation, loso_auroc, ...; `chosen` marks the pack's
    aggregations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.primary not in self.methods:
            raise ValueError(f"primary method {self.primary!r} is not among {list(self.methods)}")
        for name, m in self.methods.items():
            for s, y in self.labels.items():
                if s not in m.scores or len(m.scores[s]) != len(y):
                    raise ValueError(f"method {name!r} has no scores for all {len(y)} examples of {s!r}")


# --------------------------------------------------------------------------------- numbers


def results_table(report: ReportData) -> list[dict[str, Any]]:
    """One row per (eval set, method): n and `binary_metrics` at the method's threshold."""
    rows = []
    for s, y in report.labels.items():
        for name, m in report.methods.items():
            d = binary_metrics(y, m.scores[s], m.threshold)
            rows.append({"eval_set": s, "method": name, "n": len(y), "n_pos": d["n_pos"], "n_neg": d["n_neg"],
                         **{k: d.get(k) for k in METRICS}, "threshold": m.threshold})
    return rows


def _operating_point(row: dict[str, Any], positives_recall: float | None) -> tuple[str, float] | None:
    """What "better at the shipped threshold" means on a set: higher recall on harmful-only sets,
    higher balanced accuracy on mixed ones. On benign-only sets a method that flags nothing has a
    perfect FPR, so FPR there is weighed against the method's recall on the held-out positives of
    the ROC set when there is one (balanced accuracy again); without one, lower FPR wins
    (sign-flipped, so that higher is always better)."""
    if row["recall_at_threshold"] is None and row["fpr_at_threshold"] is None:
        return None
    if not row["n_neg"]:
        return "recall at threshold", row["recall_at_threshold"]
    if not row["n_pos"]:
        if positives_recall is None:
            return "FPR at threshold (lower is better)", -row["fpr_at_threshold"]
        return "balanced accuracy: held-out recall, FPR here", (positives_recall + 1 - row["fpr_at_threshold"]) / 2
    return "balanced accuracy at threshold", (row["recall_at_threshold"] + 1 - row["fpr_at_threshold"]) / 2


def verdicts(report: ReportData, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per eval set: which method is best at its shipped operating point, and whether the probe wins."""
    out = []
    held_out = {r["method"]: r["recall_at_threshold"] for r in rows if r["eval_set"] == report.roc_set}
    for s in report.labels:
        points = {r["method"]: p for r in rows
                  if r["eval_set"] == s and (p := _operating_point(r, held_out.get(r["method"])))}
        if report.primary not in points or len(points) < 2:
            continue
        criterion, probe = points[report.primary]
        others = {k: v for k, (_, v) in points.items() if k != report.primary}
        rival = max(others, key=others.get)
        gap = probe - others[rival]
        outcome = "tie" if abs(gap) < TIE else ("win" if gap > 0 else "loss")
        best = report.primary if gap >= 0 else rival
        out.append({"eval_set": s, "criterion": criterion, "best": best, "outcome": outcome,
                    "probe": abs(probe), "best_rival": rival, "rival": abs(others[rival]), "margin": abs(gap)})
    return out


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# ----------------------------------------------------------------------------------- plots


def png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_base64(fig)}">'


def _roc_data(report: ReportData) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    if report.roc_set is not None:
        s = report.roc_set
        return s, report.labels[s], {k: m.scores[s] for k, m in report.methods.items()}
    sets = list(report.labels)
    y = np.concatenate([report.labels[s] for s in sets])
    pooled = {k: np.concatenate([m.scores[s] for s in sets]) for k, m in report.methods.items()}
    return "all eval sets pooled", y, pooled


def roc_plot(report: ReportData) -> str | None:
    """ROC of every method on the combined set, linear and log-FPR (where the 1% operating point lives)."""
    name, y, scores = _roc_data(report)
    if len(set(y.tolist())) < 2:
        return None
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    lin, log = fig.subplots(1, 2)
    for colour, (method, s) in zip(PALETTE, scores.items()):
        fpr, tpr, _ = roc_curve(y, s)
        width = 2.4 if method == report.primary else 1.6
        label = f"{method} (AUROC {roc_auc_score(y, s):.3f})"
        for ax in (lin, log):
            ax.plot(fpr, tpr, color=colour, lw=width, label=label)
    lin.plot([0, 1], [0, 1], color="#999", lw=1, ls=":")
    log.set_xscale("log")
    log.set_xlim(1e-3, 1)
    for x in (0.01, 0.001):
        log.axvline(x, color="#bbb", lw=1, ls="--")
    for ax, t in ((lin, "ROC"), (log, "ROC, log FPR")):
        ax.set(xlabel="false-positive rate", ylabel="recall (true-positive rate)", ylim=(0, 1.01), title=t)
        ax.grid(alpha=0.3)
    lin.legend(loc="lower right", fontsize=9)
    fig.suptitle(f"{name}: {int(y.sum())} positive, {int((1 - y).sum())} negative")
    return _img(fig, f"ROC curves on {name}")


def histogram_plot(report: ReportData) -> str:
    """The primary method's score distribution per eval set, benign and harmful apart, threshold marked."""
    m = report.methods[report.primary]
    sets = list(report.labels)
    cols = min(3, len(sets))
    rows = math.ceil(len(sets) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    bins = np.linspace(0, 1, 41)
    for ax, s in zip(axes, sets):
        y, sc = report.labels[s], np.clip(m.scores[s], 0, 1)
        for lab, colour, text in ((0, "#3b7dd8", "benign / honest"), (1, "#d7301f", "harmful / deceptive")):
            if (y == lab).any():
                ax.hist(sc[y == lab], bins=bins, color=colour, alpha=0.6, label=f"{text} ({int((y == lab).sum())})")
        if m.threshold is not None:
            ax.axvline(m.threshold, color="black", ls="--", lw=1.2, label=f"threshold {m.threshold:.3g}")
        ax.set_title(s, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("score", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    return _img(fig, f"score histograms of {report.primary} per eval set")


def _layer(hook_point: str) -> int:
    return int(hook_point.split(".")[1])


def sweep_plot(report: ReportData) -> str | None:
    """Cross-validated AUROC against layer, one line per (kind, pool), the chosen configuration starred."""
    if not report.sweep:
        return None
    sites = {r["hook_point"].split(".", 2)[2] for r in report.sweep}
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in report.sweep:
        key = f"{r['kind']} / {r['pool']}" + (f" / {r['hook_point'].split('.', 2)[2]}" if len(sites) > 1 else "")
        lines.setdefault(key, []).append((_layer(r["hook_point"]), r["cv_auroc"]))
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    for colour, (key, pts) in zip(PALETTE * 4, sorted(lines.items())):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", ms=4, color=colour, label=key)
    chosen = report.chosen or max(report.sweep, key=lambda r: r["cv_auroc"])
    ax.plot([_layer(chosen["hook_point"])], [chosen["cv_auroc"]], marker="*", ms=16, color="gold", mec="black",
            ls="none", label=f"chosen: {chosen['hook_point']} {chosen['kind']}/{chosen['pool']}")
    ax.set(xlabel="layer", ylabel="out-of-fold AUROC", title="Layer sweep (cross-validation on training rows only)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _img(fig, "cross-validated AUROC against layer")


# --------------------------------------------------------------------------------- heatmaps


def score_colour(score: float, threshold: float | None = None) -> str:
    """Background colour of a token with this score (shared by the legend and the tests).

    With the probe's `threshold` the scale diverges there: blue below, white at it, red above, so a
    benign token at 0.3 under a threshold of 0.9 reads as safe; without one (latent activations
    relative to their peak) it runs from pale yellow to dark red."""
    return to_hex(_rgba(score, threshold))


def text_colour(score: float, threshold: float | None = None) -> str:
    r, g, b, _ = _rgba(score, threshold)
    return "#111" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def _rgba(score: float, threshold: float | None):
    x = float(np.clip(score, 0, 1))
    if threshold is None:
        return HEAT_CMAP(x)
    centre = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    return DIVERGING_CMAP(float(TwoSlopeNorm(centre, vmin=0.0, vmax=1.0)(x)))


def heatmap_html(h: Heatmap, threshold: float | None) -> str:
    spans = "".join(
        f'<span class="tok" title="{s:.3f}" style="background:{score_colour(s, threshold)};'
        f'color:{text_colour(s, threshold)}">{html.escape(t)}</span>'
        for t, s in h.tokens
    )
    context = f'<span class="ctx">{html.escape(h.context)}</span>' if h.context else ""
    return (f'<figure class="heat"><figcaption>{html.escape(h.title)}</figcaption>'
            f'<div class="toks">{context}{spans}</div></figure>')


def legend_html(threshold: float | None) -> str:
    stops = ", ".join(f"{score_colour(x, threshold)} {x * 100:.1f}%"
                      for x in sorted({*np.linspace(0, 1, 21).tolist(), *([threshold] if threshold else [])}))
    mark = (f'<span class="thr" style="left:{threshold * 100:.1f}%" title="threshold">'
            f"threshold {threshold:.3g}</span>") if threshold is not None else ""
    return (f'<div class="legend"><span>0</span><div class="bar" style="background:linear-gradient(to right, {stops})">'
            f"{mark}</div><span>1</span><span class=\"muted\">token score (probe probability)</span></div>")


# -------------------------------------------------------------------------------------- html

CSS = """
:root{--ink:#1c2230;--muted:#667085;--line:#e4e7ec;--accent:#1f4e99;--bg:#f7f8fa}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:var(--ink);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:28px 24px 60px}
header{border-bottom:3px solid var(--accent);margin-bottom:20px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 10px;color:var(--accent)}
.muted{color:var(--muted)}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:14px 0;overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#eef2f8;position:sticky;top:0;font-weight:600}
td:first-child,th:first-child,td.l,th.l{text-align:left}
tr.first td{border-top:2px solid #cfd6e2}
tr.primary td.m{font-weight:600;color:var(--accent)}
td.best{font-weight:700;background:#eaf4ea}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}dt{color:var(--muted)}dd{margin:0}
.win{color:#1a7f37;font-weight:600}.loss{color:#b42318;font-weight:600}.tie{color:var(--muted);font-weight:600}
img{max-width:100%;height:auto;display:block;margin:6px auto}
.heat{margin:14px 0;padding:0}.heat figcaption{font-weight:600;margin-bottom:4px}
.toks{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;
border:1px solid var(--line);border-radius:6px;padding:8px 10px;background:#fff}
.tok{border-radius:2px}.ctx{color:#98a2b3}
.legend{display:flex;align-items:center;gap:8px;margin:4px 0 10px}
.bar{position:relative;width:320px;height:14px;border:1px solid var(--line);border-radius:3px}
.thr{position:absolute;top:-3px;height:20px;border-left:2px solid #000;padding-left:3px;font-size:11px;
white-space:nowrap;line-height:20px;transform:translateY(14px)}
footer{margin-top:30px;font-size:12px;color:var(--muted)}
"""

# Render self-check: after load, records how many images decoded and how many token spans got a
# background, on <body data-*>. Harmless for readers; tests/probes/test_report.py reads it.
CHECK_JS = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var toks = Array.prototype.slice.call(document.querySelectorAll(".tok"));
  var d = document.body.dataset;
  d.images = imgs.length;
  d.imagesOk = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  d.tokens = toks.length;
  d.tokensColoured = toks.filter(function (t) {
    return getComputedStyle(t).backgroundColor !== "rgba(0, 0, 0, 0)"; }).length;
  d.rendered = "1";
});
"""


def _fmt(x: Any) -> str:
    if x is None:
        return "&ndash;"
    return f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def _table_html(report: ReportData, rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{METRIC_LABELS[k]}</th>" for k in METRICS)
    body = []
    for s in report.labels:
        group = [r for r in rows if r["eval_set"] == s]
        best = {}
        for k in METRICS:
            vals = [r[k] for r in group if r[k] is not None]
            if len(vals) > 1:
                best[k] = min(vals) if k == "fpr_at_threshold" else max(vals)
        for i, r in enumerate(group):
            cls = ("first " if i == 0 else "") + ("primary" if r["method"] == report.primary else "")
            cells = "".join(
                f'<td class="best">{_fmt(r[k])}</td>' if k in best and r[k] == best[k] else f"<td>{_fmt(r[k])}</td>"
                for k in METRICS
            )
            name = f'<td class="l">{html.escape(s)}</td>' if i == 0 else "<td></td>"
            body.append(f'<tr class="{cls}">{name}<td class="l m">{html.escape(r["method"])}</td>'
                        f'<td>{r["n_pos"]}</td><td>{r["n_neg"]}</td>{cells}</tr>')
    return (f'<table><thead><tr><th class="l">eval set</th><th class="l">method</th><th>n+</th><th>n&minus;</th>{head}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _loso_html(report: ReportData) -> str:
    if not report.loso:
        return ('<p class="muted">The pack records no leave-one-source-out numbers (train it with '
                "<code>--recipe harmful_intent_v2</code>, or any recipe selected by held-out source).</p>")
    methods = list(report.loso)
    head = "".join(f"<th>{html.escape(k)} AUROC</th><th>{html.escape(k)} recall / FPR</th>" for k in methods)
    body = []
    for unit in report.loso[methods[0]]:
        cells = []
        for k in methods:
            d = report.loso[k].get(unit, {})
            rate = d.get("recall_at_1pct_fpr", d.get("fpr_at_1pct_fpr"))
            cells.append(f"<td>{_fmt(d.get('auroc'))}</td><td>{_fmt(rate)}</td>")
        d = report.loso[methods[0]][unit]
        n = d.get("n_pos", d.get("n_neg"))
        body.append(f'<tr><td class="l">{html.escape(unit)}</td><td>{"" if n is None else int(n)}</td>'
                    f"{''.join(cells)}</tr>")
    return (f'<table><thead><tr><th class="l">held-out source</th><th>n</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _aggregations_html(report: ReportData) -> str:
    if not report.aggregations:
        return ('<p class="muted">The pack records no comparison of aggregations (a recipe selected by held-out '
                "source makes one).</p>")
    body = []
    for r in report.aggregations:
        agg = ", ".join(f"{k} {v}" if k != "kind" else str(v) for k, v in r["aggregation"].items())
        mark = " (shipped)" if r.get("chosen") else ""
        body.append(f'<tr><td class="l">{html.escape(agg + mark)}</td><td>{_fmt(r.get("loso_auroc"))}</td>'
                    f'<td>{_fmt(r.get("loso_recall_at_1pct_fpr"))}</td><td>{_fmt(r.get("loso_worst_unit_auroc"))}</td></tr>')
    return ('<table><thead><tr><th class="l">aggregation</th><th>AUROC</th><th>recall @1% FPR</th>'
            f"<th>worst source AUROC</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def _verdicts_html(report: ReportData, vs: list[dict[str, Any]]) -> str:
    if not vs:
        return '<p class="muted">No calibrated baseline to compare with.</p>'
    counts = {o: sum(v["outcome"] == o for v in vs) for o in ("win", "loss", "tie")}
    items = []
    for v in vs:
        e = {k: html.escape(str(v[k])) for k in ("eval_set", "outcome", "best", "criterion", "best_rival")}
        items.append(f'<tr><td class="l">{e["eval_set"]}</td><td class="l {e["outcome"]}">{e["outcome"]}</td>'
                     f'<td class="l">{e["best"]}</td><td class="l">{e["criterion"]}</td><td>{v["probe"]:.3f}</td>'
                     f'<td class="l">{e["best_rival"]}</td><td>{v["rival"]:.3f}</td></tr>')
    return (f"<p>At the shipped operating points, <b>{report.primary}</b> wins on {counts['win']} eval set(s), "
            f"loses on {counts['loss']}, ties on {counts['tie']} (|difference| &lt; {TIE}).</p>"
            '<table><thead><tr><th class="l">eval set</th><th class="l">probe</th><th class="l">best</th>'
            f'<th class="l">criterion</th><th>{html.escape(report.primary)}</th>'
            '<th class="l">best rival</th><th>rival</th>'
            f"</tr></thead><tbody>{''.join(items)}</tbody></table>")


def _manifest_html(report: ReportData) -> str:
    m = report.manifest
    methods = {f"method: {k}": (f"threshold {v.threshold:.4g}" if v.threshold is not None else "no threshold")
               + (f"; {v.description}" if v.description else "") for k, v in report.methods.items()}
    pairs = {**m, **methods}.items()
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in pairs)
    return f"<dl>{items}</dl>"


def render_html(report: ReportData, rows: list[dict[str, Any]], vs: list[dict[str, Any]]) -> str:
    """The whole page as one string (no external resources)."""
    roc, sweep = roc_plot(report), sweep_plot(report)
    threshold = report.methods[report.primary].threshold
    heat = (legend_html(threshold) + "".join(heatmap_html(h, threshold) for h in report.heatmaps)) \
        if report.heatmaps else (
        '<p class="muted">No examples.</p>')
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(report.title)}</title><style>{CSS}</style></head>
<body><main>
<header><h1>{html.escape(report.title)}</h1><p class="muted">latentwatch evaluation report &middot; {stamp}</p></header>
<section><h2>Pack</h2>{_manifest_html(report)}{f"<ul>{notes}</ul>" if notes else ""}</section>
<section><h2>Where the probe wins / where it loses</h2>{_verdicts_html(report, vs)}</section>
<section><h2>Results</h2><p class="muted">Recall / FPR @thr use each method's own threshold, calibrated at the
same target FPR on the same benign set as the probe's. Best value per eval set in bold.</p>
{_table_html(report, rows)}</section>
<section><h2>Each source held out</h2><p class="muted">Each source (and label) held out in turn with its groups;
every row scored by a model that never saw its source. Harmful sources: AUROC against every benign row and recall
at the threshold that flags 1% of the benign rows; benign sources: AUROC of every harmful row against it and its
FPR at that threshold. The pooled test split above mixes every source into training; this does not.</p>
{_loso_html(report)}</section>
<section><h2>Serving aggregation</h2><p class="muted">How the bank pools token scores, each candidate scored on
the same held-out sources (every row by the model that never saw its source); the best AUROC, then recall, ships.
A mean drifts on long or repetitive input; the max of rolling means needs a window of evidence.</p>
{_aggregations_html(report)}</section>
<section><h2>ROC curves</h2>{roc or '<p class="muted">The combined set lacks one of the labels.</p>'}</section>
<section><h2>Score histograms ({html.escape(report.primary)})</h2>{histogram_plot(report)}</section>
<section><h2>Layer sweep</h2>{sweep or '<p class="muted">No sweep recorded in the manifest.</p>'}</section>
<section><h2>Token-level scores</h2><p class="muted">Each token coloured by the probe's per-token probability
(hover for the value); grey text is context the probe does not score.</p>{heat}</section>
<footer>Generated by latentwatch. Everything on this page is inline; it needs no network.</footer>
</main><script>{CHECK_JS}</script></body></html>
"""


def write_report(out_dir: str | Path, report: ReportData) -> Path:
    """Write results.csv, results.json and index.html into `out_dir`; returns the index.html path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = results_table(report)
    vs = verdicts(report, rows)
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    summary = {
        "title": report.title,
        "primary": report.primary,
        "manifest": report.manifest,
        "methods": {k: {"threshold": m.threshold, "description": m.description} for k, m in report.methods.items()},
        "results": rows,
        "verdicts": vs,
        "sweep": report.sweep,
        "loso": report.loso,
        "aggregations": report.aggregations,
        "notes": report.notes,
    }
    (out / "results.json").write_text(json.dumps(_clean(summary), indent=2), encoding="utf-8")
    index = out / "index.html"
    index.write_text(render_html(report, rows, vs), encoding="utf-8")
    return index


# ----------------------------------------------------------------------------- from a model

def _heatmap_examples(sets: dict[str, list], n: int, seed: int, max_chars: int = 600) -> list[tuple[str, Any]]:
    """A seeded mix of harmful, benign and jailbreak-wrapped examples, round-robin, short ones first."""
    buckets: dict[str, list[tuple[str, Any]]] = {"harmful": [], "benign": [], "wrapped": []}
    for s, exs in sets.items():
        if s == "test":  # the union of other sets; picking from them names the source set
            continue
        for e in exs:
            kind = "wrapped" if WRAPPED.match(s) else ("harmful" if e.label == 1 else "benign")
            buckets[kind].append((s, e))
    rng = random.Random(seed)
    for b in buckets.values():
        rng.shuffle(b)
        b.sort(key=lambda se: len(se[1].content_key) > max_chars)  # stable: short ones first, still shuffled
    picked: list[tuple[str, Any]] = []
    while len(picked) < n and any(buckets.values()):
        for b in buckets.values():
            if b and len(picked) < n:
                picked.append(b.pop(0))
    return picked


def _manifest_summary(pack) -> dict[str, Any]:
    m = pack.manifest
    cal = m.calibration
    prov = m.provenance
    out = {
        "pack": f"{m.id} v{m.version}",
        "probe": f"{m.kind} at {m.hook_point}, {m.aggregation.kind} aggregation",
        "threshold": f"{m.threshold:.4g}",
        "calibration": (f"{cal.target_fpr:.2%} target FPR on {cal.benign_set} (n={cal.n_benign}, "
                        f"achieved {cal.achieved_fpr:.2%})") if cal else "none",
        "model": f"{prov.get('model_id', '?')} ({m.model.architecture}, {m.model.num_layers} layers)",
        "recipe": prov.get("recipe") or "custom data",
        "trained on": f"{prov.get('n_train', '?')} examples, {prov.get('params', {}).get('folds', '?')}-fold "
                      f"cross-validated selection",
    }
    if "selection" in prov:
        out["selection"] = prov["selection"].get("rule", "")
    return out


def build_report_data(runner, pack, splits, *, compare=(), baselines: bool = True, n_heatmaps: int = 6,
                      batch_size: int = 16, seed: int = 0, progress: bool = True) -> ReportData:
    """Score the pack, the `compare` packs (e.g. SAE-feature detectors trained on the same recipe), a
    TF-IDF baseline and the prompted judge on the splits' held-out sets.

    Baselines are calibrated at the pack's target FPR on the pack's own named benign set; where
    the splits lack that set (plain --data evaluation) they report threshold-free metrics only,
    and the TF-IDF baseline needs the splits' train part.
    """
    from monitor.bank import Detector, DetectorBank
    from monitor.runner import encode_all
    from probes.baselines import PromptedJudge, TfidfBaseline
    from probes.train import dev_folds, score_sets

    m = pack.manifest
    sets = {k: v for k, v in {"test": splits.test, **splits.eval_sets}.items() if v}
    if not sets:
        raise ValueError("nothing to evaluate: the splits have no test or eval examples")
    labels = {k: np.array([e.label for e in v], dtype=int) for k, v in sets.items()}
    methods = {"probe": MethodScores(score_sets(runner, pack, sets, batch_size=batch_size, progress=progress),
                                     m.threshold, f"{m.kind} @ {m.hook_point}, {m.aggregation.kind}")}
    for other in compare:
        o = other.manifest
        methods[o.id] = MethodScores(score_sets(runner, other, sets, batch_size=batch_size, progress=progress),
                                     o.threshold, f"{o.kind} @ {o.hook_point}, {o.aggregation.kind}")
    notes = []
    if baselines:
        cal_name = m.calibration.benign_set if m.calibration else None
        benign = splits.calibration.get(cal_name) if cal_name else None
        target = m.calibration.target_fpr if m.calibration else 0.01
        if not benign:
            notes.append(f"Baselines uncalibrated: the benign set {cal_name!r} is not part of these splits.")
        recipe = splits.info.get("recipe") or m.provenance.get("recipe")
        candidates = [PromptedJudge.for_recipe(runner, recipe, batch_size=batch_size, progress=progress)]
        dev = splits.train + splits.val  # what the probe was trained on (see probes.train)
        if dev:
            candidates.insert(0, TfidfBaseline(seed=seed).fit(dev))
        else:
            notes.append("TF-IDF baseline skipped: no training split.")
        unique = list(dict.fromkeys(e for v in sets.values() for e in v))  # "test" repeats other sets
        for b in candidates:
            by_example = dict(zip(unique, b.scores(unique)))
            if benign and isinstance(b, TfidfBaseline):
                folds = dev_folds(dev, m.provenance.get("params", {}).get("folds", 5), seed)
                b.calibrate_out_of_fold(dev, folds, benign, target)
            elif benign:
                b.calibrate(benign, target)
            methods[b.name] = MethodScores({k: np.array([by_example[e] for e in v]) for k, v in sets.items()},
                                           b.threshold, b.description)
    loso = _loso_methods(pack, splits.train + splits.val if baselines else [], seed)
    heatmaps = []
    picked = _heatmap_examples(sets, n_heatmaps, seed)
    if picked:
        chat = m.input_format == "chat"
        items = encode_all(runner, [e for _, e in picked], chat=chat)
        bank = DetectorBank([Detector.from_pack(pack)], device=runner.device)
        for (s, e), enc, r in zip(picked, items, runner.score(items, bank, batch_size=batch_size, token_scores=True)):
            starts = [a for a, _ in r.token_offsets] + [r.token_offsets[-1][1]]
            tokens = [(enc.text[a:b], float(p)) for a, b, p in zip(starts, starts[1:], r.token_probs[:, 0])]
            verdict = "flagged" if r.flagged[0] else "not flagged"
            title = f"{s} · label {e.label} · probe {r.probs[0]:.3f} ({verdict})"
            heatmaps.append(Heatmap(title, tokens, context=enc.text[: starts[0]]))
    summary = _manifest_summary(pack)
    return ReportData(
        title=f"latentwatch report: {m.id}",
        labels=labels,
        methods=methods,
        roc_set="test" if "test" in sets and len(set(labels["test"].tolist())) == 2 else None,
        sweep=m.provenance.get("selection", {}).get("sweep", []),
        chosen=m.provenance.get("selection", {}).get("chosen"),
        heatmaps=heatmaps,
        manifest=summary,
        notes=notes,
        loso=loso,
        aggregations=[{**r, "chosen": r["aggregation"] == m.aggregation.model_dump(exclude_none=True)}
                      for r in m.provenance.get("selection", {}).get("aggregations", [])],
    )


def _loso_methods(pack, dev: list, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """The pack's leave-one-source-out numbers (from its manifest) and, given its training rows, the
    TF-IDF baseline's, fitted on the same folds."""
    from probes.baselines import TfidfBaseline
    from probes.loso import held_out_scores, unit_folds, unit_metrics

    recorded = {k: v for k, v in pack.manifest.metrics.items() if k == "loso" or k.startswith("loso/")}
    if not recorded:
        return {}
    out = {"probe": {("all (pooled)" if k == "loso" else k[5:]): v for k, v in recorded.items()}}
    if dev:
        def fit(train):
            baseline = TfidfBaseline(seed=seed).fit([dev[i] for i in train])
            return lambda held: baseline.scores([dev[i] for i in held])

        folds = unit_folds(dev)
        tfidf = unit_metrics(dev, folds, held_out_scores(folds, fit, len(dev)))
        out["tfidf"] = {"all (pooled)": {k: v for k, v in tfidf.items() if k != "units"}, **tfidf["units"]}
    return out
