"""`latentwatch` command line: train, eval, score, detectors (and serve, alerts from cli_serve)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from monitor.cli_serve import register as register_service_commands

app = typer.Typer(no_args_is_help=True, add_completion=False, help="White-box safety monitor for language models.")
console = Console(stderr=True)
# Tables go to stdout; when piped, rich would squeeze them to 80 columns and cut ids short.
out = Console() if sys.stdout.isatty() else Console(width=200)

ModelOpt = Annotated[str | None, typer.Option("--model", help="HF id, local folder, GGUF file; default SmolLM2-135M")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda / cpu (default: cuda when available)")]


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def load_runner(model: str | None, device: str | None):
    from monitor.runner import ModelRunner

    with console.status(f"loading model {model or 'SmolLM2-135M-Instruct (default)'}..."):
        try:
            return ModelRunner.load(model, device=device)
        except (OSError, ValueError) as e:
            fail(f"cannot load model {model!r}: {e}")


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


def load_pack_folders(folders: list[Path], runner=None, detectors: list[str] | None = None):
    """Load and validate packs (against the model's fingerprint when a runner is given)."""
    from probes.pack import PackError, load_packs

    try:
        loaded = load_packs(folders, expect=runner.fingerprint if runner is not None else None)
    except PackError as e:
        fail(str(e))
    return [p for p in loaded if not detectors or p.manifest.id in detectors]


def read_examples(path: Path, *, labelled: bool):
    from probes.data import DataError, read_jsonl

    try:
        return read_jsonl(path, labelled=labelled)
    except (DataError, OSError) as e:
        fail(str(e))


# ------------------------------------------------------------------------------------ train

LOGISTIC_GRID = [("logistic", {"C": c}) for c in (0.01, 0.1, 1.0)]
RECIPE_SWEEPS = {
    "harmful_intent": {"probes": LOGISTIC_GRID, "pools": ["mean", "last"], "calibration": "dev_benign"},
    "deception": {"probes": [*LOGISTIC_GRID, ("lat", {}), ("diff_means", {})], "pools": ["mean"],
                  "calibration": "dev_honest", "enabled_by_default": False,
                  "description": "Apollo-style instructed-pairs deception probe. Off by default: check the "
                                 "liedetector_qa metrics for your model before enabling it (on SmolLM2-135M it "
                                 "is at chance there)."},
}


def sweep_hook_points(num_layers: int) -> list[str]:
    """Residual stream from ~15% to ~80% of depth, every depth/15 blocks: 4, 6, ..., 24 on a 30-block model."""
    return [f"blocks.{i}.resid_post" for i in range(round(0.14 * num_layers), round(0.8 * num_layers) + 1,
                                                     max(1, num_layers // 15))]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="folder to write the probe pack to")],
    recipe: Annotated[str | None, typer.Option(help="harmful_intent or deception (reads ../shared/datasets)")] = None,
    data: Annotated[Path | None, typer.Option(help="labelled JSONL: {text|messages, label}")] = None,
    val: Annotated[Path | None, typer.Option(help="more labelled JSONL, pooled with --data")] = None,
    calibration: Annotated[Path | None, typer.Option(help="benign JSONL to calibrate on "
                                                     "(default: label-0 rows of --data, scored out of fold)")] = None,
    calibration_name: Annotated[str | None, typer.Option(help="name recorded for the benign set")] = None,
    eval_data: Annotated[list[Path] | None, typer.Option("--eval", help="labelled JSONL held-out set(s)")] = None,
    pack_id: Annotated[str | None, typer.Option("--id", help="pack id (default: recipe name or output folder)")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="probe kind(s): logistic, diff_means, lat, mlp")] = None,
    hook_point: Annotated[list[str] | None, typer.Option(help="hook point(s), e.g. blocks.14.resid_post")] = None,
    pool: Annotated[list[str] | None, typer.Option(help="token pooling for training: mean, last")] = None,
    target_fpr: Annotated[float, typer.Option(help="false-positive rate on the benign set")] = 0.01,
    folds: Annotated[int, typer.Option(help="cross-validation folds for selection and calibration")] = 5,
    raw: Annotated[bool, typer.Option("--raw", help="score text as raw text, not as a user chat turn")] = False,
    datasets: Annotated[str | None, typer.Option(help="shared datasets folder (recipes)")] = None,
    seed: int = 0,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Fit a probe pack through the serving path: sweep, calibrate, evaluate, write."""
    from probes.train import TrainData, TrainSpec, train_pack

    if (recipe is None) == (data is None):
        fail("give either --recipe NAME or --data FILE")
    sweep = RECIPE_SWEEPS.get(recipe or "", {})
    if recipe:
        from probes.recipes import RECIPES, datasets_dir

        if recipe not in RECIPES:
            fail(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
        try:
            splits = RECIPES[recipe](datasets_dir(datasets), seed=seed)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        cal_name = sweep["calibration"]
        tdata = TrainData(splits.train + splits.val, cal_name, splits.calibration[cal_name],
                          {"test": splits.test, **splits.eval_sets}, recipe=recipe)
    else:
        dev = read_examples(data, labelled=True) + (read_examples(val, labelled=True) if val is not None else [])
        if calibration is None:
            cal_rows, cal_name = [r for r in dev if r.label == 0], "train_negatives"
        else:
            cal_rows, cal_name = read_examples(calibration, labelled=False), calibration_name or calibration.stem
        if not cal_rows:
            fail("no benign examples to calibrate on: pass --calibration FILE")
        evals = {p.stem: read_examples(p, labelled=True) for p in eval_data or []}
        tdata = TrainData(dev, cal_name, cal_rows, evals)
    runner = load_runner(model, device)
    default_points = sweep_hook_points(runner.hooks.num_layers) if recipe else ["blocks.14.resid_post"]
    spec = TrainSpec(
        pack_id=pack_id or recipe or out.name.replace(" ", "_").lower(),
        hook_points=hook_point or default_points,
        probes=[(k, {}) for k in kind] if kind else sweep.get("probes", [("logistic", {})]),
        pools=pool or sweep.get("pools", ["mean"]),
        input_format="raw" if raw else "chat",
        target_fpr=target_fpr,
        seed=seed,
        batch_size=batch_size,
        folds=folds,
        description=sweep.get("description", ""),
        enabled_by_default=sweep.get("enabled_by_default", True),
    )
    try:
        pack, table = train_pack(runner, tdata, spec)
    except ValueError as e:
        fail(str(e))
    pack.save(out)
    m = pack.manifest
    console.print(f"[green]wrote[/] {out}  ({m.kind} @ {m.hook_point}, {m.aggregation.kind} pooling, "
                  f"threshold {m.threshold:.4f} at {target_fpr:.2%} FPR on {m.calibration.benign_set})")
    print_metrics(m.metrics)


def print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    table = Table("set", "n+", "n-", "AUROC", "AUPRC", "recall@1%FPR", "recall@thr", "FPR@thr")
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
    for name, d in metrics.items():
        table.add_row(name, str(int(d.get("n_pos", 0))), str(int(d.get("n_neg", 0))), fmt(d, "auroc"), fmt(d, "auprc"),
                      fmt(d, "recall_at_1pct_fpr"), fmt(d, "recall_at_threshold"), fmt(d, "fpr_at_threshold"))
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
    seed: int = 0,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Score packs on labelled data: AUROC, AUPRC, recall at 1% FPR, rates at the pack threshold."""
    from probes.recipes import Splits
    from probes.train import evaluate_sets

    if not data and not recipe:
        fail("give --data FILE (labelled JSONL) or --recipe NAME")
    sets = {p.stem: read_examples(p, labelled=True) for p in data or []}
    splits = Splits(train=[], val=[], test=[], eval_sets=dict(sets))  # what --report sees without a recipe
    if recipe:
        from probes.recipes import RECIPES, datasets_dir

        if recipe not in RECIPES:
            fail(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
        splits = RECIPES[recipe](datasets_dir(datasets), seed=seed)
        splits.eval_sets = {**sets, **splits.eval_sets}
        sets |= {"test": splits.test, **splits.eval_sets}
    folders = pack_folders(pack, detector)
    runner = load_runner(model, device)
    results = {}
    packs = load_pack_folders(folders, runner, detector)
    for p in packs:
        results[p.manifest.id] = evaluate_sets(runner, p, sets, batch_size=batch_size, progress=True)
        if report:
            from probes.report import build_report_data, write_report

            out = report if len(packs) == 1 else report / p.manifest.id
            index = write_report(out, build_report_data(runner, p, splits, batch_size=batch_size, seed=seed))
            console.print(f"[green]report[/] {index}")
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for pid, metrics in results.items():
        out.print(f"[bold]{pid}[/]")
        print_metrics(metrics)


# ------------------------------------------------------------------------------------ score

@app.command()
def score(
    input: Annotated[Path, typer.Option("--input", help="JSONL: {id?, text|messages}")],
    output: Annotated[Path, typer.Option("--output", help="JSONL with scores and flags per input")],
    detector: Annotated[list[str] | None, typer.Option(help="detector id(s); default: all shipped packs")] = None,
    pack: Annotated[list[Path] | None, typer.Option(help="probe pack folder(s) instead of shipped packs")] = None,
    batch_size: int = 16,
    model: ModelOpt = None,
    device: DeviceOpt = None,
):
    """Score unlabelled text: one line out per line in, p in [0, 1], flagged at each pack's threshold."""
    from monitor.bank import Detector, DetectorBank
    from monitor.runner import encode_all
    from probes.data import write_jsonl

    examples = read_examples(input, labelled=False)
    folders = pack_folders(pack, detector)
    runner = load_runner(model, device)
    packs = load_pack_folders(folders, runner, detector)
    try:
        bank = DetectorBank([Detector.from_pack(p) for p in packs], device=runner.device)
    except ValueError as e:
        fail(str(e))
    results = runner.score(encode_all(runner, examples, chat=bank.input_format == "chat"), bank,
                           batch_size=batch_size, progress=True)
    write_jsonl(output, (
        {"id": ex.id, "scores": dict(zip(bank.ids, map(float, r.probs))),
         "flagged": dict(zip(bank.ids, map(bool, r.flagged)))}
        for ex, r in zip(examples, results)
    ))
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
