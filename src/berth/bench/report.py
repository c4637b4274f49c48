"""Aggregate bench records into results.json, a Markdown summary and PNG plots."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from berth.bench.runner import BenchSettings, RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _distribution(values: list[float]) -> dict:
    result = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    result["mean"] = sum(values) / len(values) if values else None
    return result


def summarize(records: list[RequestRecord]) -> list[dict]:
    """One row per (model, concurrency): latency distributions, rates, errors, schema validity."""
    groups: dict[tuple[str, int], list[RequestRecord]] = {}
    for record in records:
        groups.setdefault((record.model, record.concurrency), []).append(record)
    rows = []
    for (model, concurrency), group in groups.items():
        ok = [r for r in group if r.ok]
        span = max(r.started + r.e2e_s for r in group) - min(r.started for r in group)
        tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                if r.ttft_s is not None and r.output_tokens > 1]
        row = {
            "model": model, "concurrency": concurrency, "scenario": group[0].scenario,
            "requests": len(group), "succeeded": len(ok),
            "errors": dict(Counter(r.error for r in group if not r.ok)),
            "ttft_s": _distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
            "itl_s": _distribution([gap for r in ok for gap in r.itl_s]),
            "tpot_s": _distribution(tpot),
            "e2e_s": _distribution([r.e2e_s for r in ok]),
            "output_tokens": sum(r.output_tokens for r in ok),
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / span if span > 0 else None,
            "requests_per_s": len(ok) / span if span > 0 else None,
        }
        checked = [r for r in ok if r.json_valid is not None]
        if checked:
            row["json_valid_share"] = sum(1 for r in checked if r.json_valid) / len(checked)
        rows.append(row)
    return rows


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f}"


def markdown(settings: BenchSettings, rows: list[dict]) -> str:
    schema = settings.json_schema is not None
    lines = [
        f"# berth bench: {settings.scenario} against {settings.url}",
        "",
        f"{settings.requests} requests per model and concurrency, max_tokens {settings.max_tokens}, "
        f"{'streaming' if settings.stream else 'not streaming'}. Times in ms.",
        "",
        "| model | conc | ok | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | TPOT p50 | E2E p50 | E2E p90 "
        "| E2E p99 | out tok/s | req/s | errors |" + (" valid JSON |" if schema else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if schema else ""),
    ]
    for row in rows:
        errors = ", ".join(f"{k} x{v}" for k, v in row["errors"].items()) or "none"
        rate = row["output_tokens_per_s"]
        rps = row["requests_per_s"]
        cells = [row["model"], str(row["concurrency"]), f"{row['succeeded']}/{row['requests']}",
                 *(_ms(row["ttft_s"][f"p{p}"]) for p in PERCENTILES), _ms(row["itl_s"]["p50"]),
                 _ms(row["itl_s"]["p99"]), _ms(row["tpot_s"]["p50"]),
                 *(_ms(row["e2e_s"][f"p{p}"]) for p in PERCENTILES),
                 "–" if rate is None else f"{rate:.1f}", "–" if rps is None else f"{rps:.2f}", errors]
        if schema:
            share = row.get("json_valid_share")
            cells.append("–" if share is None else f"{share:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(records: list[RequestRecord], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (model, concurrency) in {(r.model, r.concurrency) for r in records}:
        ok = [r for r in records if r.ok and r.model == model and r.concurrency == concurrency]
        label = f"{model} c={concurrency}"
        axes[0].hist([r.e2e_s * 1000 for r in ok], bins=20, alpha=0.6, label=label)
        axes[1].hist([r.ttft_s * 1000 for r in ok if r.ttft_s is not None], bins=20, alpha=0.6, label=label)
    for ax, title in zip(axes, ("end-to-end latency (ms)", "time to first token (ms)"), strict=True):
        ax.set_title(title)
        ax.set_ylabel("requests")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "latency.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(row["model"] for row in rows):
        points = sorted((row["concurrency"], row["output_tokens_per_s"] or 0) for row in rows if row["model"] == model)
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=model)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput by concurrency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def write(settings: BenchSettings, records: list[RequestRecord], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    results = {"settings": {k: v for k, v in asdict(settings).items() if k not in ("api_key", "prompts")},
               "prompts": len(settings.prompts), "summary": rows, "requests": [r.as_dict() for r in records]}
    if settings.prompt_source == "built-in":  # a user's own prompts stay theirs; berth's set is recorded
        results["built_in_prompts"] = list(settings.prompts)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(settings, rows))
    plots(records, rows, out)
    return results
