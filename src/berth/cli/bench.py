"""`berth bench`: latency, throughput and errors of models behind any OpenAI-compatible URL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
import jsonschema
from click.core import ParameterSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from berth.bench import report
from berth.bench.images import BadImages, BenchImage, load_images
from berth.bench.prompts import BUILT_IN
from berth.bench.runner import BenchSettings, BenchSetupError, RequestRecord, check_target, run
from berth.cli.common import err_console, fail


def _concurrency_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{value!r} is not a list of positive numbers; write for example 1,4,16")
    return levels


@click.command()
@click.option("--url", required=True, help="Base URL of an OpenAI-compatible server (with or without /v1).")
@click.option("--model", "models", multiple=True, required=True, help="Model to measure; repeat for several.")
@click.option("--requests", "n_requests", default=20, show_default=True, type=click.IntRange(1),
              help="Requests per model and concurrency level (swap: per model).")
@click.option("--concurrency", default="1", show_default=True, callback=_concurrency_list,
              help="Requests in flight at once; a list such as 1,4,16 sweeps.")
@click.option("--prompt", help="The user message (default: a built-in set of short and long prompts).")
@click.option("--prompt-file", type=click.Path(dir_okay=False),
              help="A file with the user message; .jsonl: one prompt per line (a string or {\"prompt\": ...}).")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--json-schema", "schema_path", type=click.Path(dir_okay=False),
              help="Ask for JSON matching this schema and report the share that parses and validates.")
@click.option("--scenario", type=click.Choice(["warm", "cold", "swap"]), default="warm", show_default=True,
              help="warm: loaded first; cold: unloaded (berth's API) before each request; swap: alternate models.")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key (default: $OPENAI_API_KEY).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds per request.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for results.json, summary.md and the PNG plots.")
@click.option("--compare", "compare_url",
              help="A second server sent the same request list, interleaved with --url's; prints B/A ratios.")
@click.option("--compare-model", "compare_models", multiple=True,
              help="The --compare server's name for each --model, in order (default: the same names).")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1),
              help="Send the request list this many times (per server, interleaved); ratios show the spread.")
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="A directory of .jpg/.png/.webp images: each request sends one with the prompt, in name order "
                   "for every model (--requests defaults to one per image); per_image.csv and a ranking follow.")
@click.option("--score-field",
              help="A number in each answer's JSON object (e.g. score): its distribution per model in scores.png "
                   "and the share of answers tied at the top score.")
def bench(url: str, models: tuple[str, ...], n_requests: int, concurrency: list[int], prompt: str | None,
          prompt_file: str | None, max_tokens: int, stream: bool, schema_path: str | None, scenario: str,
          api_key: str | None, timeout: float, out_dir: str, compare_url: str | None,
          compare_models: tuple[str, ...], rounds: int, images_dir: str | None, score_field: str | None) -> None:
    """Measure latency, throughput and errors of models behind any OpenAI-compatible URL (or two, side by side)."""
    base = _base_url("--url", url)
    compare_base = _base_url("--compare", compare_url) if compare_url is not None else None
    if compare_models and (compare_base is None or len(compare_models) != len(models)):
        fail("--compare-model names the --compare server's model for each --model: give --compare and "
             f"--compare-model {len(models)} time(s), once per --model")
    images = _bench_images(images_dir) if images_dir else []
    if images and click.get_current_context().get_parameter_source("n_requests") is ParameterSource.DEFAULT:
        n_requests = len(images)
    prompts, prompt_source = _bench_prompts(prompt, prompt_file, IMAGE_PROMPT if images else None)
    schema = _json_schema(schema_path) if schema_path else None
    if score_field is not None:
        _check_score_field(score_field, schema, schema_path)
    if scenario == "swap" and len(models) < 2:
        fail("--scenario swap alternates models; give --model at least twice")
    if scenario in ("cold", "swap") and concurrency != [1]:
        fail(f"--scenario {scenario} sends one request at a time; drop --concurrency")
    settings = BenchSettings(base, list(models), n_requests, concurrency, prompts, max_tokens, stream, scenario,
                             schema, api_key, timeout, prompt_source, compare_base, list(compare_models) or None,
                             rounds, images, score_field)
    try:
        asyncio.run(check_target(settings))
        records = _run_with_progress(settings)
    except BenchSetupError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    results = report.write(settings, records, Path(out_dir))
    click.echo(report.markdown(settings, results["summary"], results.get("compare"), results.get("ranking")))
    written = ["results.json", "summary.md", "latency.png", "throughput.png"]
    written += ["per_image.csv"] if report.choosing(settings) else []
    written += ["scores.png"] if score_field else []
    click.echo(f"wrote {out_dir}/{', '.join(written)}")


IMAGE_PROMPT = "Describe this image."  # with --images and neither --prompt nor --prompt-file


def _bench_images(directory: str) -> list[BenchImage]:
    try:
        images, skipped = load_images(Path(directory))
    except BadImages as exc:
        fail(str(exc))
    if skipped:
        err_console.print(f"--images: not images, not sent: {', '.join(skipped)}", highlight=False)
    converted = [i.name for i in images if i.converted_from]
    if converted:
        err_console.print(f"--images: sent as PNG (llama.cpp reads no WebP): {', '.join(converted)}", highlight=False)
    return images


def _check_score_field(name: str, schema: Any, schema_path: str | None) -> None:
    """With a schema, the score field is one of its properties and a number."""
    if schema is None:
        return
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict) or name not in properties:
        listed = ", ".join(properties) if isinstance(properties, dict) and properties else "none"
        fail(f"--score-field {name} is not a property of --json-schema {schema_path} (its properties: {listed}); "
             "name the numeric field the answers hold")
    kinds = properties[name].get("type") if isinstance(properties[name], dict) else None
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not {"number", "integer"} & set(kinds):
        fail(f"--score-field {name} is of type {properties[name].get('type')!r} in --json-schema {schema_path}; "
             "it must be a number or an integer")


def _run_with_progress(settings: BenchSettings) -> list[RequestRecord]:
    """The requests' records, with a bar for all requests and one per phase (model and concurrency level)."""
    phases = settings.phases()
    total = settings.total_requests()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        overall = bar.add_task("all requests", total=total)
        tasks: dict[str, TaskID] = {}

        def advance(label: str, done: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total // phases)
            bar.advance(tasks[label], done)
            bar.advance(overall, done)

        return asyncio.run(run(settings, advance))


def _base_url(flag: str, url: str) -> str:
    base = url.rstrip("/").removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        fail(f"{flag} {url!r} must start with http:// or https://")
    return base


def _json_schema(schema_path: str) -> Any:
    try:
        schema = json.loads(Path(schema_path).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
    except OSError as exc:
        fail(f"cannot read --json-schema {schema_path}: {exc.strerror}")
    except ValueError as exc:
        fail(f"--json-schema {schema_path} is not JSON: {exc}")
    except jsonschema.SchemaError as exc:
        fail(f"--json-schema {schema_path} is not a valid JSON Schema: {exc.message}")
    return schema


def _bench_prompts(prompt: str | None, prompt_file: str | None, default: str | None = None) -> tuple[list[str], str]:
    """The prompts to send and where they come from (recorded in results.json); without either option,
    `default`, else the built-in set."""
    if prompt and prompt_file:
        fail("give one of --prompt TEXT or --prompt-file FILE, not both")
    if prompt:
        return [prompt], "--prompt"
    if not prompt_file:
        return ([default] if default else list(BUILT_IN)), "built-in"
    try:
        with open(prompt_file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read --prompt-file {prompt_file}: {exc}")
    source = f"--prompt-file {prompt_file}"
    if not prompt_file.endswith(".jsonl"):
        if not text.strip():
            fail(f"--prompt-file {prompt_file} is empty")
        return [text], source
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            fail(f"{prompt_file}:{number}: not JSON; each line is a string or {{\"prompt\": \"...\"}}")
        value = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(value, str) or not value:
            fail(f"{prompt_file}:{number}: no prompt; each line is a string or {{\"prompt\": \"...\"}}")
        prompts.append(value)
    if not prompts:
        fail(f"--prompt-file {prompt_file} has no prompts")
    return prompts, source
