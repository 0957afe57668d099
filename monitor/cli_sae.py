"""`latentwatch sae train`: a TopK SAE on the model's activations at one hook point, written as an SAE pack.

Only typer and rich load with this module; the model, torch and the trainer load inside the command,
so `latentwatch --help` stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from monitor.cli_common import DeviceOpt, ModelOpt, console, fail, load_runner, out

app = typer.Typer(no_args_is_help=True, add_completion=False)
DTYPES = ("int8", "float16", "bfloat16", "float32")


@app.callback()
def sae() -> None:
    """Sparse autoencoders: train one on the model's activations."""


@app.command()
def train(
    hook_point: Annotated[str, typer.Option("--hook-point", help="where the SAE reads, e.g. blocks.15.resid_post")],
    latents: Annotated[int, typer.Option("--latents", help="number of SAE latents (d_sae)")] = 4096,
    k: Annotated[int, typer.Option("--k", help="latents active per token (TopK)")] = 32,
    model: ModelOpt = None,
    tokens: Annotated[int, typer.Option("--tokens", help="activations to train on (the data repeats when it "
                                        "holds fewer)")] = 2_000_000,
    out_dir: Annotated[Path | None, typer.Option("--out", help="folder to write the SAE pack to "
                                                 "(default: ./<id>)")] = None,
    seed: int = 0,
    dtype: Annotated[str, typer.Option("--dtype", help=f"how the pack stores W_enc and W_dec: {', '.join(DTYPES)} "
                                       "(int8: one scale per latent; a 4096 x 576 SAE is 4.5 MiB)")] = "int8",
    datasets: Annotated[str | None, typer.Option("--datasets", help="shared datasets folder "
                                                 "(default: $LATENTWATCH_DATASETS or ../shared/datasets)")] = None,
    alpaca: Annotated[bool, typer.Option("--alpaca", help="also train on Alpaca (CC BY-NC 4.0: the pack is then "
                                         "derived from non-commercial data)")] = False,
    generate: Annotated[int, typer.Option("--generate", help="training prompts the model answers, so the SAE "
                                          "also sees generated tokens")] = 256,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="length of each answer")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="activations per optimiser step")] = 4096,
    raw: Annotated[bool, typer.Option("--raw", help="read prompts as raw text, not as a user chat turn")] = False,
    pack_id: Annotated[str | None, typer.Option("--id", help="pack id (default: topk-<layer>-<site>-<latents>)")
                       ] = None,
    device: DeviceOpt = None,
):
    """Train a TopK SAE (AuxK, unit-norm decoder), report on held-out text, write manifest.json + sae.safetensors."""
    from monitor.domain import HookPoint, HookPointError

    try:
        point = HookPoint.parse(hook_point)
    except HookPointError as e:
        fail(f"--hook-point: {e}")
    if latents < 1:
        fail(f"--latents {latents}: give a positive number of latents, e.g. 4096")
    if not 1 <= k <= latents:
        fail(f"--k {k} must be between 1 and --latents ({latents}): a TopK SAE keeps k of its latents per token")
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    pack_id = pack_id or f"topk-{point.layer}-{point.site}-{latents}".replace("_", "-")
    out_dir = out_dir or Path(pack_id)
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file; give a folder")

    from probes.sae_train import PACK_ID, SAETrainSpec, recipe_data, save_sae_pack, train_sae

    if not re.fullmatch(PACK_ID, pack_id):
        fail(f"--id {pack_id!r}: use only a-z, 0-9, '_' and '-'")
    spec = SAETrainSpec(hook_point=str(point), d_sae=latents, k=k, tokens=tokens, batch_size=batch_size,
                        generate=generate, max_new_tokens=max_new_tokens, input_format="raw" if raw else "chat",
                        dtype=dtype, seed=seed)
    try:
        spec.check()
        data = recipe_data(datasets, alpaca=alpaca)  # the shipped probes' splits, whatever --seed says
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    runner = load_runner(model, device)
    try:
        runner.hooks.resolve(point)
    except HookPointError as e:
        fail(f"--hook-point: {e}")
    try:
        trained = train_sae(runner, data, spec)
        save_sae_pack(out_dir, trained, pack_id=pack_id, model=runner.fingerprint, model_id=runner.model_id)
    except (ValueError, OSError) as e:
        fail(str(e))
    print_report(trained.report)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    console.print(f"[green]wrote[/] {out_dir}  ({spec.dtype}, {size / 2**20:.2f} MiB; load it with "
                  f"monitor.sae.load_sae)")


def print_report(report: dict) -> None:
    """The held-out metrics, what storage cost, and what training cost, as one table."""
    held, loss, train = report["held_out"], report["held_out"]["next_token_loss"], report["training"]
    store, machine = report["storage"], report["machine"]
    table = Table("held-out metric", "value", title=f"SAE report ({held['tokens']:,} held-out tokens, "
                                                    f"{held['texts']} texts)")
    rows = [
        ("L0 (active latents per token)", f"{held['l0']:.2f}"),
        ("fraction of variance explained", f"{held['fve']:.4f}"),
        ("dead latents", f"{held['dead_latents']} ({held['dead_fraction']:.1%})"),
        ("next-token loss, clean", f"{loss['clean']:.4f}"),
        ("next-token loss, SAE spliced in", f"{loss['spliced']:.4f}"),
        ("loss increase", f"{loss['increase']:+.4f}"),
        (f"FVE change from storing {store['dtype']}", f"{store['fve_change']:+.5f}"),
        ("training tokens (unique, epochs)", f"{train['tokens']:,} ({train['unique_tokens']:,}, "
                                             f"{train['epochs']:.1f})"),
        ("wall time", f"{report['timings_s']['total']:.0f} s (generate {report['timings_s']['generate']:.0f}, "
                      f"train {report['timings_s']['train']:.0f}, evaluate {report['timings_s']['evaluate']:.0f})"),
        ("machine", f"{machine['gpu'] or machine['cpu']}, torch {machine['torch']}"),
    ]
    for row in rows:
        table.add_row(*row)
    out.print(table)


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="sae")
