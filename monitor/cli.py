"""`latentwatch` command line: train, eval, score, detectors (serve, alerts from cli_serve; token from cli_token;
features search from cli_features; sae train from cli_sae)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from monitor.cli_common import DeviceOpt, ModelOpt, console, encode_rows, fail, load_runner, locate, out, read_examples
from monitor.cli_features import register as register_feature_commands
from monitor.cli_policy import register as register_policy_commands
from monitor.cli_sae import register as register_sae_commands
from monitor.cli_serve import register as register_service_commands
from monitor.cli_steer import register as register_steer_commands
from monitor.cli_token import register as register_token_commands

app = typer.Typer(no_args_is_help=True, add_completion=False, help="White-box safety monitor for language models.")

POOLS = ("mean", "last", "max")  # token poolings training can sweep (what ModelRunner.capture pools)


def pack_folders(packs: list[Path] | None, detectors: list[str] | None) -> list[Path]:
    """Pack folders given by path, else the shipped packs named, else those enabled by default."""
    from probes.pack import PackError, default_pack_dirs, shipped_packs

    if packs:
        return list(packs)
    try:
        shipped = shipped_packs()
    except PackError as e:
        fail(str(e))
    unknown = [d for d in detectors or [] if d not in shipped]
    if unknown:
        fail(f"unknown detector id(s) {unknown}; shipped packs: {sorted(shipped)}. Use --pack FOLDER for others.")
    folders = [shipped[d][0] for d in detectors] if detectors else default_pack_dirs()
    if not folders:
        fail("no probe packs: pass --pack FOLDER (a folder with manifest.json and weights.safetensors)")
    return folders


def compare_folders(refs: list[str]) -> list[Path]:
    """--compare: a shipped detector id, else a pack folder."""
    from probes.pack import shipped_packs

    shipped = shipped_packs() if refs else {}
    return [shipped[r][0] if r in shipped else Path(r) for r in refs]


def load_pack_folders(folders: list[Path], runner=None, detectors: list[str] | None = None):
    """Load and validate packs, against the model's fingerprint when a runner is given (without
    one, everything else is checked: call it before loading the model too). Keeps the packs
    named in `detectors`, each of which must be there."""
    from probes.pack import PackError, load_packs

    try:
        loaded = load_packs(folders, expect=runner.fingerprint if runner is not None else None)
    except PackError as e:
        fail(str(e))
    if not detectors:
        return loaded
    held = [p.manifest.id for p in loaded]
    missing = [d for d in detectors if d not in held]
    if missing:
        fail(f"--detector {', '.join(missing)}: not in the packs given, which hold {', '.join(held)}; "
             "name one of those or pass that detector's pack with --pack FOLDER")
    return [p for p in loaded if p.manifest.id in detectors]


MODEL_RECIPES = ("harmful_completion",)  # recipes whose rows the model writes (its own answers)


def load_recipe(recipe: str, datasets: str | None, seed: int, runner=None, answers: Path | None = None):
    from probes.recipes import RECIPES, datasets_dir

    if recipe not in RECIPES and recipe not in MODEL_RECIPES:
        fail(f"unknown recipe {recipe!r}; known: {sorted([*RECIPES, *MODEL_RECIPES])}")
    if recipe in MODEL_RECIPES and runner is None:
        fail(f"--recipe {recipe} is for `latentwatch train`: its rows are the model's own answers")
    try:
        if recipe in MODEL_RECIPES:
            return completion_recipe(runner, datasets_dir(datasets), seed, answers)
        return RECIPES[recipe](datasets_dir(datasets), seed=seed)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def completion_recipe(runner, root: Path, seed: int, answers: Path | None = None):
    """harmful_completion's rows: the model answers the v2 recipe's requests, plainly and with the
    shipped refusal vector on (kept in `answers`, when given)."""
    from probes.completion import completion_splits
    from probes.vectors import load_vector_pack, shipped_vectors_dir

    refusal = load_vector_pack(shipped_vectors_dir() / "refusal", expect=runner.fingerprint).steering()
    return completion_splits(runner, refusal, root, seed=seed, answers_dir=answers, progress=True)


# ------------------------------------------------------------------------------------ train

LOGISTIC_GRID = [("logistic", {"C": c}) for c in (0.01, 0.1, 1.0)]
# v2: held-out sources favoured the strongest regularisation at every depth (C = 0.01 over 0.1 over 1)
LOGISTIC_GRID_V2 = [("logistic", {"C": c}) for c in (0.001, 0.003, 0.01)]
SAE_PROBE_GRID = [("sae_probe", {"C": c}) for c in (0.03, 0.1, 0.3)]
# v2: ranked by leave-one-source-out scores; the winner's serving aggregation chosen through the bank
WINDOWS = [{"kind": "mean"}] + [{"kind": "max_rolling_mean", "window": w} for w in (4, 8, 16)]
RECIPE_SWEEPS = {
    "harmful_intent": {"probes": LOGISTIC_GRID, "pools": ["mean", "last"], "calibration": "dev_benign"},
    # `version`: what a pack records, and every alert with it; a recipe that changes the probe bumps it
    # `reads`: a request detector's rules decide on the prompt (its answers were never trained on)
    "harmful_intent_v2": {"probes": LOGISTIC_GRID_V2, "pools": ["mean"], "calibration": "dev_benign", "version": "2",
                          "reads": "prompt",
                          "selection": "loso", "aggregations": WINDOWS, "sites": ("resid_post", "mlp_out", "attn_out")},
    "harmful_completion": {"probes": LOGISTIC_GRID_V2, "pools": ["mean"], "calibration": "benign_answers",
                           "reads": "completion",
                           "selection": "loso", "aggregations": WINDOWS, "enabled_by_default": False,
                           "description": "Harmful content in the model's own answer: its rules read the "
                                          "generated tokens only. Off by default: read its catch_curve metrics "
                                          "for your model first."},
    "deception": {"probes": [*LOGISTIC_GRID, ("lat", {}), ("diff_means", {})], "pools": ["mean"],
                  "calibration": "dev_honest", "enabled_by_default": False,
                  "description": "Apollo-style instructed-pairs deception probe. Off by default: check the "
                                 "liedetector_qa metrics for your model before enabling it (on SmolLM2-135M it "
                                 "is at chance there)."},
    "deception_v2": {"probes": [*LOGISTIC_GRID, ("lat", {}), ("diff_means", {})], "pools": ["mean"], "version": "2",
                     "calibration": "dev_honest", "enabled_by_default": False,
                     "description": "Deception probe trained on instructed pairs and on LieDetector Q/A lies and "
                                    "truths (its test questions held out). Off by default: read its liedetector_qa "
                                    "numbers for your model before enabling it."},
}


def sweep_hook_points(num_layers: int, sites: tuple[str, ...] = ("resid_post",)) -> list[str]:
    """Residual stream from ~15% to ~80% of depth, every depth/15 blocks: 4, 6, ..., 24 on a 30-block model;
    other `sites` (mlp_out, attn_out) at ~40% and ~60% of depth."""
    last = min(round(0.8 * num_layers), num_layers - 1)
    points = [f"blocks.{i}.resid_post" for i in range(round(0.14 * num_layers), last + 1, max(1, num_layers // 15))]
    return points + [f"blocks.{round(f * num_layers)}.{site}" for site in sites if site != "resid_post"
                     for f in (0.4, 0.6)]


def check_train_options(kind: list[str] | None, hook_point: list[str] | None, pool: list[str] | None) -> None:
    """What --kind, --hook-point and --pool can get wrong without the model (layer range needs it)."""
    from monitor.domain import HookPoint, HookPointError
    from probes.kinds import PROBE_KINDS

    for k in kind or []:
        if k not in PROBE_KINDS:
            fail(f"unknown --kind {k!r}; known kinds: {', '.join(sorted(PROBE_KINDS))}")
    for name in hook_point or []:
        try:
            HookPoint.parse(name)
        except HookPointError as e:
            fail(f"--hook-point: {e}")
    for p in pool or []:
        if p not in POOLS:
            fail(f"unknown --pool {p!r}; use one of {', '.join(POOLS)}")


@app.command()
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the probe pack to")],
    recipe: Annotated[str | None, typer.Option(help="harmful_intent, harmful_intent_v2, harmful_completion (the "
                                               "model's own answers), deception or deception_v2 "
                                               "(reads ../shared/datasets)")] = None,
    data: Annotated[Path | None, typer.Option(help="labelled JSONL: {text|messages, label}")] = None,
    val: Annotated[Path | None, typer.Option(help="more labelled JSONL, pooled with --data")] = None,
    calibration: Annotated[Path | None, typer.Option(help="benign JSONL to calibrate on "
                                                     "(default: label-0 rows of --data, scored out of fold)")] = None,
    calibration_name: Annotated[str | None, typer.Option(help="name recorded for the benign set")] = None,
    eval_data: Annotated[list[Path] | None, typer.Option("--eval", help="labelled JSONL held-out set(s)")] = None,
    pack_id: Annotated[str | None, typer.Option("--id", help="pack id (default: recipe name or output folder)")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="probe kind(s): logistic, diff_means, lat, mlp "
                                                   "(default: logistic; recipes sweep their own)")] = None,
    hook_point: Annotated[list[str] | None, typer.Option(help="hook point(s), e.g. blocks.14.resid_post (default: "
                                                         "resid_post every ~depth/15 blocks, 15%-80% of depth)")
                          ] = None,
    pool: Annotated[list[str] | None, typer.Option(help="token pooling(s) for training: mean, last "
                                                   "(default: both), max (SAE latents)")] = None,
    sae: Annotated[str | None, typer.Option("--sae", help="train an SAE-feature detector on this SAE's latents "
                                            "(a folder, or a shipped SAE id such as topk-18-resid-post-4096): "
                                            "--kind sae_probe (default) or sae_latent")] = None,
    target_fpr: Annotated[float, typer.Option(help="false-positive rate on the benign set")] = 0.01,
    folds: Annotated[int, typer.Option(help="cross-validation folds for selection and calibration")] = 5,
    raw: Annotated[bool, typer.Option("--raw", help="score text as raw text, not as a user chat turn")] = False,
    datasets: Annotated[str | None, typer.Option(help="shared datasets folder (recipes)")] = None,
    answers: Annotated[Path | None, typer.Option(help="with a recipe whose rows the model writes: keep its "
                                                 "answers here as JSONL, to read them or train again "
                                                 "without generating (reused when they match)")] = None,
    seed: int = 0,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Fit a probe pack through the serving path: sweep, calibrate, evaluate, write."""
    from probes.train import TrainData, TrainSpec, train_pack

    if (recipe is None) == (data is None):
        fail("give either --recipe NAME or --data FILE")
    check_train_options(kind, hook_point, pool)
    if answers is not None and recipe not in MODEL_RECIPES:
        fail(f"--answers: only for recipes whose rows the model writes ({', '.join(MODEL_RECIPES)})")
    if sae is not None:
        from monitor.sae import SAEError
        from monitor.sae.store import resolve

        if hook_point:
            fail("--hook-point: an SAE-feature detector reads its SAE's hook point; leave --hook-point out")
        try:
            resolve(sae)
        except SAEError as e:
            fail(f"--sae: {e}")
    sweep = RECIPE_SWEEPS.get(recipe or "", {})
    runner = load_runner(model, device) if recipe in MODEL_RECIPES else None
    if recipe:
        splits = load_recipe(recipe, datasets, seed, runner, answers)
        cal_name = sweep["calibration"]
        tdata = TrainData(splits.train + splits.val, cal_name, splits.calibration[cal_name],
                          {"test": splits.test, **splits.eval_sets}, recipe=recipe)
        inputs = [("training rows", tdata.dev), (cal_name, tdata.calibration), *tdata.eval_sets.items()]
    else:
        inputs = [(p, read_examples(p, labelled=True)) for p in (data, val) if p is not None]
        dev = [row for _, rows in inputs for row in rows]
        if calibration is None:
            cal_rows, cal_name = [r for r in dev if r.label == 0], "train_negatives"
        else:
            cal_rows, cal_name = read_examples(calibration, labelled=False), calibration_name or calibration.stem
            inputs.append((calibration, cal_rows))
        if not cal_rows:
            fail("no benign examples to calibrate on: pass --calibration FILE")
        evals = [(p, read_examples(p, labelled=True)) for p in eval_data or []]
        inputs += evals
        tdata = TrainData(dev, cal_name, cal_rows, {p.stem: rows for p, rows in evals})
    runner = runner or load_runner(model, device)
    for source, rows in inputs:
        encode_rows(runner, rows, chat=not raw, source=source)
    spec = TrainSpec(
        pack_id=pack_id or recipe or out_dir.name.replace(" ", "_").lower(),
        hook_points=hook_point or sweep_hook_points(runner.hooks.num_layers, sweep.get("sites", ("resid_post",))),
        probes=[(k, {}) for k in kind] if kind else SAE_PROBE_GRID if sae else sweep.get("probes", [("logistic", {})]),
        pools=pool or (["mean", "max"] if sae else sweep.get("pools", ["mean", "last"])),
        sae=sae,
        input_format="raw" if raw else "chat",
        target_fpr=target_fpr,
        seed=seed,
        batch_size=batch_size,
        folds=folds,
        version=sweep.get("version", "1"),
        selection=sweep.get("selection", "cv"),
        aggregations=sweep.get("aggregations"),
        description=f"SAE-feature detector on the latents of SAE {sae}" if sae else sweep.get("description", ""),
        # an SAE's encoder costs decode speed: a shipped feature detector is served when asked for
        enabled_by_default=not sae and sweep.get("enabled_by_default", True),
        reads=sweep.get("reads", "both"),
    )
    try:
        pack, table = train_pack(runner, tdata, spec)
        pack.save(out_dir)
    except (ValueError, OSError) as e:  # PackError is a ValueError
        fail(str(e))
    if recipe in MODEL_RECIPES:
        write_catch_curve(runner, pack, out_dir, datasets, seed, batch_size)
    m = pack.manifest
    scaled = f", Platt-scaled (a {m.platt.a:.3g}, b {m.platt.b:.3g})" if m.platt else ""
    console.print(f"[green]wrote[/] {out_dir}  ({m.kind} @ {m.hook_point}, {m.aggregation.kind} pooling{scaled}, "
                  f"threshold {m.threshold:.4f} at {target_fpr:.2%} FPR on {m.calibration.benign_set}; "
                  f"best of {len(table)} candidate(s))")
    print_metrics(m.metrics)


def write_catch_curve(runner, pack, out_dir: Path, datasets: str | None, seed: int, batch_size: int) -> None:
    """What a completion detector adds to the shipped `harmful_intent` while the model writes: into
    the manifest (`metrics["catch_curve"]`) and `catch_curve.png` beside it."""
    from dataclasses import asdict

    from probes.completion import catch_curve, catch_curve_requests
    from probes.recipes import datasets_dir

    (intent,) = load_pack_folders(pack_folders(None, ["harmful_intent"]), runner)
    wrapped, benign = catch_curve_requests(datasets_dir(datasets), seed)
    curve = catch_curve(runner, intent, pack, wrapped, benign, batch_size=batch_size, progress=True)
    pack.manifest.metrics["catch_curve"] = {k: float(v) for k, v in curve.summary().items() if v is not None}
    pack.manifest.provenance["catch_curve"] = asdict(curve)  # per request: tokens read when it was first flagged
    pack.save(out_dir)
    curve.figure().savefig(out_dir / "catch_curve.png", dpi=120)


def print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    """Held-out sets at the pack's threshold; then, where the pack has them, each source held out."""
    table = Table("set", "n+", "n-", "AUROC", "AUPRC", "recall@1%FPR", "recall@thr", "FPR@thr")
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
    loso = {k: d for k, d in metrics.items() if k == "loso" or k.startswith("loso/")}
    for name, d in metrics.items():
        if name in loso or name == "catch_curve":
            continue
        table.add_row(name, str(int(d.get("n_pos", 0))), str(int(d.get("n_neg", 0))), fmt(d, "auroc"), fmt(d, "auprc"),
                      fmt(d, "recall_at_1pct_fpr"), fmt(d, "recall_at_threshold"), fmt(d, "fpr_at_threshold"))
    out.print(table)
    if loso:
        table = Table("held-out source", "n", "AUROC", "recall@1%FPR", "FPR@1%FPR",
                      title="leave one source out (each scored by a model that never saw it)")
        for name, d in loso.items():
            n = d.get("n_pos", d.get("n_neg"))
            table.add_row("all (pooled)" if name == "loso" else name[5:], "-" if n is None else str(int(n)),
                          fmt(d, "auroc"), fmt(d, "recall_at_1pct_fpr"), fmt(d, "fpr_at_1pct_fpr"))
        out.print(table)
    if (c := metrics.get("catch_curve")) is not None:
        print_catch_curve(c)


def print_catch_curve(c: dict[str, float]) -> None:
    """A completion detector's catch curve (`probes.completion.CatchCurve.summary`)."""
    from probes.completion import CATCH_AT

    reads = [k for k in CATCH_AT if f"catch_at_{k}" in c]
    fpr = next(k for k in c if k.startswith("benign_fpr_at_"))
    table = Table("requests", "n", *(f"flagged by {k} tokens" for k in reads), "median tokens to detection",
                  title=f"catch curve: {int(c['let_through'])} of {int(c['asked'])} jailbreak-wrapped harmful "
                        "requests were let through on the prompt by harmful_intent")
    median = c.get("median_tokens_to_detection")
    table.add_row("harmful, let through", str(int(c["let_through"])), *(f"{c[f'catch_at_{k}']:.3f}" for k in reads),
                  "-" if median is None else f"{median:g}")
    table.add_row("benign", str(int(c["n_benign"])), *([""] * (len(reads) - 1)), f"{c[fpr]:.3f}", "")
    out.print(table)


# ------------------------------------------------------------------------------------- eval

@app.command("eval")
def eval_(
    pack: Annotated[list[Path] | None, typer.Option(help="probe pack folder(s)")] = None,
    detector: Annotated[list[str] | None, typer.Option(help="shipped detector id(s)")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="labelled JSONL file(s)")] = None,
    recipe: Annotated[str | None, typer.Option(help="evaluate on a recipe's held-out sets")] = None,
    datasets: Annotated[str | None, typer.Option(help="shared datasets folder (recipes)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="write HTML/CSV/JSON reports (with baselines) "
                                                "to this folder")] = None,
    compare: Annotated[list[str] | None, typer.Option("--compare", help="with --report: a pack folder or shipped "
                                                      "detector id shown beside each pack (e.g. an SAE-feature "
                                                      "detector), scored on the same sets")] = None,
    causal: Annotated[bool, typer.Option("--causal", help="steer along the --detector's direction and measure "
                                         "refusals on held-out harmful and harmless prompts, and its own score "
                                         "(with --report: causal.html)")] = False,
    coefficients: Annotated[str | None, typer.Option(help="with --causal: comma-separated multiples of the mean "
                                                     "residual norm at the hook point, 0 included "
                                                     "(default: -0.2,-0.1,0,0.1,0.2)")] = None,
    prompts: Annotated[int | None, typer.Option("--prompts", help="with --causal: prompts per set, a seeded sample "
                                                "(default: 16)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="with --causal: greedy tokens per completion "
                                                       "(default: 48)")] = None,
    seed: int = 0,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Score packs on labelled data: AUROC, AUPRC, recall at 1% FPR, rates at the pack threshold."""
    from probes.recipes import Splits
    from probes.train import evaluate_sets

    if causal:
        return causal_eval(pack, detector, data, recipe, datasets, as_json, report, compare, coefficients, prompts,
                           max_new_tokens, seed, batch_size, model, device)
    if coefficients is not None or prompts is not None or max_new_tokens is not None:
        fail("--coefficients, --prompts and --max-new-tokens set up the causal check: add --causal")
    if not data and not recipe:
        fail("give --data FILE (labelled JSONL) or --recipe NAME")
    sets = {p.stem: read_examples(p, labelled=True) for p in data or []}
    sources: dict[str, Path | str] = {p.stem: p for p in data or []}
    splits = Splits(train=[], val=[], test=[], eval_sets=dict(sets))  # what --report sees without a recipe
    if recipe:
        splits = load_recipe(recipe, datasets, seed)
        splits.eval_sets = {**sets, **splits.eval_sets}
        sets |= {"test": splits.test, **splits.eval_sets}
    if compare and not report:
        fail("--compare adds columns to the report: give --report FOLDER too")
    folders = pack_folders(pack, detector)
    for p in load_pack_folders(folders, detectors=detector):  # before the model loads
        trained_on = p.manifest.provenance.get("recipe")
        if recipe and trained_on and trained_on != recipe:
            console.print(f"[yellow]warning:[/] {p.manifest.id} was trained on the {trained_on} recipe, which "
                          f"splits rows differently: {recipe}'s held-out sets can hold rows it trained on. "
                          f"Score it with --recipe {trained_on}.")
    others = compare_folders(compare or [])
    load_pack_folders(others)
    runner = load_runner(model, device)
    packs = load_pack_folders(folders, runner, detector)
    compared = load_pack_folders(others, runner)
    for chat in {p.manifest.input_format == "chat" for p in packs}:
        for name, rows in sets.items():
            encode_rows(runner, rows, chat=chat, source=sources.get(name, name))
    results = {}
    for p in packs:
        results[p.manifest.id] = evaluate_sets(runner, p, sets, batch_size=batch_size, progress=True)
        if report:
            from probes.report import build_report_data, write_report

            folder = report if len(packs) == 1 else report / p.manifest.id
            try:
                index = write_report(folder, build_report_data(runner, p, splits, compare=compared,
                                                               batch_size=batch_size, seed=seed))
            except (ValueError, OSError) as e:
                fail(str(e))
            console.print(f"[green]report[/] {index}")
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for pid, metrics in results.items():
        out.print(f"[bold]{pid}[/]")
        print_metrics(metrics)


def causal_eval(pack, detector, data, recipe, datasets, as_json, report, compare, coefficients, prompts,
                max_new_tokens, seed, batch_size, model, device) -> None:
    """`eval --causal`: one linear detector, steered along (probes.causal)."""
    from monitor.bank import Detector, DetectorBank
    from probes.causal import (
        CAUSAL_RECIPES,
        DEFAULT_COEFFICIENTS,
        NotLinear,
        labelled_prompts,
        parse_coefficients,
        probe_direction,
        recipe_prompts,
        run_causal,
        write_causal_report,
    )

    if compare:
        fail("--compare: the causal check steers one detector; leave --compare out")
    if not detector and not pack:
        fail("--causal steers along one detector's direction: name it with --detector ID (or --pack FOLDER)")
    if data and recipe:
        fail("--causal takes its prompts from --data FILE or from --recipe NAME, not both")
    try:
        coeffs = parse_coefficients(coefficients) if coefficients is not None else DEFAULT_COEFFICIENTS
    except ValueError as e:
        fail(f"--coefficients: {e}")
    for name, value in (("--prompts", prompts), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1, got {value}")
    folders = pack_folders(pack, detector)
    packs = load_pack_folders(folders, detectors=detector)  # before the model loads
    if len(packs) != 1:
        fail(f"--causal steers one detector at a time; these packs hold {', '.join(p.manifest.id for p in packs)}: "
             "pick one with --detector ID")
    m = packs[0].manifest
    try:
        probe_direction(DetectorBank([Detector.from_pack(packs[0])]))
    except NotLinear as e:
        fail(f"--detector {m.id}: {e}" if detector else f"--pack {folders[0]}: {e}")
    if data:
        sets = labelled_prompts([e for p in data for e in read_examples(p, labelled=True)])
        for name, rows in sets.items():
            if not rows:
                fail(f"--data: no {name} prompts (label {int(name == 'harmful')}) to steer on")
    else:
        recipe = recipe or m.provenance.get("recipe")
        if recipe not in CAUSAL_RECIPES:
            why = f"--recipe {recipe} has no harmful and harmless prompts" if recipe else f"pack {m.id} names no recipe"
            fail(f"{why}: give --recipe {' or '.join(CAUSAL_RECIPES)} or --data FILE (label 1 harmful, 0 harmless)")
        # the pack's own split seed, so its held-out rows stay held out
        sets = recipe_prompts(load_recipe(recipe, datasets, m.provenance.get("seed", seed)))
    runner = load_runner(model, device)
    [p] = load_pack_folders(folders, runner, detector)
    for name, rows in sets.items():
        encode_rows(runner, rows, chat=True, source=name)
    try:
        result = run_causal(runner, p, sets, coefficients=coeffs, prompts_per_set=prompts or 16,
                            max_new_tokens=max_new_tokens or 48, batch_size=batch_size, seed=seed, progress=True)
        index = write_causal_report(report, result) if report else None
    except (ValueError, OSError) as e:
        fail(str(e))
    if index:
        console.print(f"[green]report[/] {index}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print_causal(result)


def print_causal(result) -> None:
    table = Table("set", "coefficient", "added length", "n", "refusal (phrases)", "refusal (judge)",
                  "judge P(refused)", "methods agree", "probe score", "probe score while steered")
    for x in result.points:
        table.add_row(x.set, f"{x.coefficient:+g}", f"{x.absolute:.4g}", str(x.n), f"{x.refusal_phrases:.3f}",
                      f"{x.refusal_judge:.3f}", f"{x.judge_p_refused:.3f}", f"{x.agreement:.3f}",
                      f"{x.probe_score:.3f}", f"{x.probe_score_steered:.3f}")
    par = result.params
    out.print(f"[bold]{par['detector']}[/] steered at {par['hook_point']}; coefficient x mean residual norm "
              f"{result.scale:.4g}; {par['max_new_tokens']} greedy tokens; probe score: prompt + completion "
              "re-read unsteered")
    out.print(table)


# ------------------------------------------------------------------------------------ score

@app.command()
def score(
    input: Annotated[Path, typer.Option("--input", help="JSONL: {id?, text|messages}")],
    output: Annotated[Path, typer.Option("--output", help="JSONL with scores and flags per input")],
    detector: Annotated[list[str] | None, typer.Option(help="detector id(s); default: the shipped packs "
                                                       "that are on by default")] = None,
    pack: Annotated[list[Path] | None, typer.Option(help="probe pack folder(s) instead of shipped packs")] = None,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Score unlabelled text: one line out per line in, p in [0, 1], flagged at each pack's threshold."""
    from monitor.bank import Detector, DetectorBank
    from probes.data import write_jsonl

    examples = read_examples(input, labelled=False)
    folders = pack_folders(pack, detector)
    load_pack_folders(folders, detectors=detector)  # before the model loads
    runner = load_runner(model, device)
    packs = load_pack_folders(folders, runner, detector)
    try:
        bank = DetectorBank([Detector.from_pack(p) for p in packs], device=runner.device)
    except ValueError as e:
        fail(str(e))
    items = encode_rows(runner, examples, chat=bank.input_format == "chat", source=input)
    results = runner.score(items, bank, batch_size=batch_size, progress=True)
    for i, (ex, r) in enumerate(zip(examples, results)):
        bad = [d for d, p in zip(bank.ids, r.probs) if not math.isfinite(p)]
        if bad:
            fail(f"{locate(input, i, ex)}: {', '.join(bad)} scored NaN or inf, so nothing was written to {output}; "
                 "the model's activations are not finite: check --model and --device", code=1)
    try:
        write_jsonl(output, (
            {"id": ex.id, "scores": dict(zip(bank.ids, map(float, r.probs))),
             "flagged": dict(zip(bank.ids, map(bool, r.flagged)))}
            for ex, r in zip(examples, results)
        ))
    except OSError as e:
        fail(f"cannot write {output}: {e}")
    flagged = sum(bool(r.flagged.any()) for r in results)
    console.print(f"[green]scored[/] {len(results)} inputs with {', '.join(bank.ids)}; {flagged} flagged -> {output}")


# -------------------------------------------------------------------------------- detectors

@app.command()
def detectors(
    pack: Annotated[list[Path] | None, typer.Option(help="probe pack folder(s); default: every shipped pack")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
):
    """List probe packs: id, version, kind, hook point, aggregation, threshold, calibration, default."""
    from probes.pack import PackError, shipped_packs

    try:
        folders = pack or [folder for folder, _ in shipped_packs().values()]
    except PackError as e:
        fail(str(e))
    packs = load_pack_folders(folders)
    if as_json:
        print(json.dumps([p.manifest.model_dump(exclude={"provenance"}) for p in packs], indent=2))
        return
    table = Table("id", "version", "kind", "hook point", "aggregation", "threshold", "calibrated on", "on by default")
    for p in packs:
        m = p.manifest
        cal = f"{m.calibration.target_fpr:.1%} FPR, {m.calibration.benign_set}" if m.calibration else "-"
        table.add_row(m.id, m.version, m.kind, m.hook_point, m.aggregation.kind, f"{m.threshold:.4f}", cal,
                      "yes" if m.enabled_by_default else "no (load by id)")
    out.print(table)


register_service_commands(app)
register_token_commands(app)
register_feature_commands(app)
register_sae_commands(app)
register_steer_commands(app)
register_policy_commands(app)
