"""The model store: `pull`, `models`, `rm`."""

from __future__ import annotations

import shutil
import time

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from berth.cli.common import err_console, fail
from berth.cli.loading import load, store_for
from berth.config import BerthConfig
from berth.core.errors import BadRequest, BerthError
from berth.core.refs import ModelRef, parse_ref
from berth.engine.embedded import (
    DEFAULT_MODEL_ID, EMBEDDED_MODEL_ID, SMOLLM2_FILE, SMOLLM2_REQUIREMENT, SMOLLM2_STORE_NAME, embedded_model_path,
)
from berth.engine.launch import store_reference
from berth.engine.slots import SLOTS_DIR, slot_usage
from berth.store import ModelStore
from berth.store.pull import RetryPolicy, pull as pull_model
from berth.store.store import BadSelection, NotInStore


@click.command()
@click.argument("ref", required=False)
@click.option("--mmproj", is_flag=True, help="Also fetch the repo's projector (mmproj*.gguf, F16 preferred).")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--sha256", default=None, help="Expected sha256 of a single-file model (default: the hub's LFS hash).")
@click.option("--name", default=None, help="Store name (default: derived from REF).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(1, 100), help="Attempts per request.")
@click.option("--retry-delay", default=1.0, show_default=True, type=click.FloatRange(0), help="First backoff, s.")
@click.option("--all", "pull_all", is_flag=True, help="Pull every store model of the config given with -c.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def pull(ref: str | None, mmproj: bool, revision: str | None, sha256: str | None, name: str | None, retries: int,
         retry_delay: float, pull_all: bool, config_path: str | None) -> None:
    """Download a model into the store: owner/repo:QUANT, owner/repo/path/file.gguf or hf://..."""
    config = load(config_path) if config_path else None
    store = store_for(config)
    wanted = _wanted(ref, revision, mmproj, pull_all, config)
    retry = RetryPolicy(attempts=retries, first_delay=retry_delay)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        for model_ref, projector in wanted:
            try:
                entry = pull_model(store, model_ref, name=name if not pull_all else None, mmproj=projector,
                                   sha256=sha256, retry=retry, progress=progress)
            except (BadSelection, NotInStore) as exc:
                fail(exc.message)
            except BerthError as exc:
                fail(exc.message, 1)
            click.echo(f"{entry.name}: {entry.model_path} ({entry.size / 2**20:.1f} MiB, verified)")


def _wanted(ref: str | None, revision: str | None, mmproj: bool, pull_all: bool,
            config: BerthConfig | None) -> list[tuple[ModelRef, bool | None]]:
    """(reference, with its projector) for each model to pull: REF, or with --all the config's store models."""
    if pull_all:
        if config is None:
            fail("--all needs the config: berth pull --all -c config.yaml")
        return [w for w in (store_reference(s) for s in config.models.values()) if w is not None]
    if not ref:
        fail("name a model: berth pull owner/repo:QUANT (or --all -c config.yaml)")
    try:
        return [(parse_ref(ref, revision), mmproj)]
    except BadRequest as exc:
        fail(exc.message)


@click.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def models(config_path: str | None) -> None:
    """List the models in the store."""
    store = store_for(load(config_path) if config_path else None)
    entries = store.entries()
    if not entries:
        click.echo(f"no models in {store.root}")
    click.echo(f"{'NAME':40} {'SIZE':>10} {'QUANT':12} {'VERIFIED':8} {'PROJECTOR (vision)':40} LAST USED")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "never"
        projector = e.mmproj_path.resolve().name if e.mmproj_path is not None else "-"
        click.echo(f"{e.name:40} {e.size / 2**20:>7.1f}MiB {e.quant or '-':12} {'yes' if e.verified else 'no':8} "
                   f"{projector:40} {used}")
    _print_embedded_models(store)
    slots_root = store.root / SLOTS_DIR
    models_with_slots = sorted(d for d in slots_root.iterdir() if d.is_dir()) if slots_root.is_dir() else []
    if models_with_slots:
        click.echo(f"\n{'SAVED KV SLOTS (model)':40} {'FILES':>6} {'SIZE':>10}")
        for directory in models_with_slots:
            files, size = slot_usage(directory)
            click.echo(f"{directory.name:40} {files:>6} {size / 2**20:>7.1f}MiB")


def _print_embedded_models(store: ModelStore) -> None:
    smollm2 = store.entry(SMOLLM2_STORE_NAME)
    click.echo(f"\n{'EMBEDDED (berth serve without -c)':40} {'SIZE':>10} STATUS")
    click.echo(f"{DEFAULT_MODEL_ID + ' (default)':40} {(SMOLLM2_FILE.size or 0) / 2**20:>7.1f}MiB "
               + (f"ready: {smollm2.model_path}" if smollm2 else f"fetched at first serve ({SMOLLM2_REQUIREMENT})"))
    try:
        gemma = embedded_model_path()
        click.echo(f"{EMBEDDED_MODEL_ID:40} {gemma.stat().st_size / 2**20:>7.1f}MiB ready: {gemma}")
    except (RuntimeError, OSError) as exc:
        click.echo(f"{EMBEDDED_MODEL_ID:40} {'-':>10} unavailable: {exc}")


@click.command()
@click.argument("name")
@click.option("--slots", "slots_only", is_flag=True, help="Delete the model's saved KV slots (NAME is a model id).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def rm(name: str, slots_only: bool, config_path: str | None) -> None:
    """Delete a model from the store, or with --slots its saved KV slots."""
    store = store_for(load(config_path) if config_path else None)
    if slots_only:
        directory = store.root / SLOTS_DIR / name
        if not directory.is_dir() or "/" in name or name.startswith("."):
            fail(f"no saved slots for model {name!r} in {store.root / SLOTS_DIR}")
        shutil.rmtree(directory)
        click.echo(f"removed saved slots of {name}")
        return
    try:
        store.remove(name)
    except (NotInStore, BadSelection) as exc:
        fail(exc.message)
    click.echo(f"removed {name}")
