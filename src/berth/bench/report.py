"""Aggregate bench records into results.json, a Markdown summary and PNG plots."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from berth.bench import choice
from berth.bench.runner import BenchSettings, RequestRecord
from berth.bench.stats import PERCENTILES, distribution, mean, percentile


def busy_seconds(records: list[RequestRecord]) -> float:
    """How long at least one of `records` was in flight: the union of their intervals (so time spent on
    another target, or unloading between cold requests, does not count)."""
    spans = sorted((r.started, r.started + r.e2e_s) for r in records)
    total, reach = 0.0, float("-inf")
    for begin, end in spans:
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


def removed_by_kind(records: list[RequestRecord]) -> dict[str, list[list[int]]]:
    """For each error kind, the requests it removed from the measurement: [round, index in the request list]."""
    removed: dict[str, list[list[int]]] = {}
    for r in sorted(records, key=lambda r: (r.round, r.index)):
        if not r.ok:
            removed.setdefault(str(r.error), []).append([r.round, r.index])
    return removed


def _tpot(records: list[RequestRecord]) -> list[float]:
    return [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in records
            if r.ttft_s is not None and r.output_tokens > 1]


def summarize(records: list[RequestRecord]) -> list[dict]:
    """One row per (target, model, concurrency): latency distributions, rates, errors and the requests
    they removed, retries, schema validity."""
    groups: dict[tuple[str, str, int], list[RequestRecord]] = {}
    for record in records:
        groups.setdefault((record.target, record.model, record.concurrency), []).append(record)
    rows = []
    for (target, model, concurrency), group in groups.items():
        ok = [r for r in group if r.ok]
        busy = busy_seconds(group)
        row = {
            "target": target, "model": model, "concurrency": concurrency, "scenario": group[0].scenario,
            "requests": len(group), "succeeded": len(ok),
            "errors": dict(Counter(r.error for r in group if not r.ok)),
            "removed": removed_by_kind(group),
            "retries": sum(r.retries for r in group),
            "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
            "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
            "tpot_s": distribution(_tpot(ok)),
            "e2e_s": distribution([r.e2e_s for r in ok]),
            "output_tokens": sum(r.output_tokens for r in ok),
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / busy if busy > 0 else None,
            "requests_per_s": len(ok) / busy if busy > 0 else None,
        }
        checked = [r for r in ok if r.json_valid is not None]
        if checked:
            row["json_valid_share"] = sum(1 for r in checked if r.json_valid) / len(checked)
        rows.append(row)
    return rows


# ITL as a mean: when a reader gets several tokens in one read their gaps are 0, and a p50 of 0 has no ratio
RATIOS = ("ttft_p50", "itl_mean", "e2e_p50", "output_tokens_per_s")


def _figures(paired: list[RequestRecord]) -> dict[str, float | None]:
    """The compared figures of one side over the paired requests: p50s, and tokens/s over the time they
    were in flight (a request only one side answered counts on neither)."""
    busy = busy_seconds(paired)
    return {"ttft_p50": percentile([r.ttft_s for r in paired if r.ttft_s is not None], 50),
            "itl_mean": mean([gap for r in paired for gap in r.itl_s]),
            "e2e_p50": percentile([r.e2e_s for r in paired], 50),
            "output_tokens_per_s": sum(r.output_tokens for r in paired) / busy if busy > 0 else None}


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None else None


def _spread(values: list[float | None]) -> dict:
    known = sorted(v for v in values if v is not None)
    return {"median": percentile(known, 50), "min": known[0] if known else None,
            "max": known[-1] if known else None, "rounds": values}


def compare(records: list[RequestRecord]) -> list[dict]:
    """Target B against target A for each (model, concurrency), over the requests both answered (paired
    by round and place in the request list): B/A ratios per round and their median and spread, and the
    requests each error kind removed on either side."""
    rows = []
    keys = dict.fromkeys((r.model, r.concurrency) for r in records)
    for model, concurrency in keys:
        side = {t: [r for r in records if r.target == t and r.model == model and r.concurrency == concurrency]
                for t in ("A", "B")}
        ok = {t: {(r.round, r.index): r for r in side[t] if r.ok} for t in side}
        pairs = sorted(ok["A"].keys() & ok["B"].keys())
        per_round: dict[str, list[float | None]] = {name: [] for name in RATIOS}
        for round_ in sorted({r.round for r in side["A"] + side["B"]}):
            figures = {t: _figures([ok[t][k] for k in pairs if k[0] == round_]) for t in side}
            for name in RATIOS:
                per_round[name].append(_ratio(figures["B"][name], figures["A"][name]))
        overall = {t: _figures([ok[t][k] for k in pairs]) for t in side}
        rows.append({
            "model": model, "concurrency": concurrency, "pairs": len(pairs),
            "requests": {t: len(side[t]) for t in side},
            "removed": {t: removed_by_kind(side[t]) for t in side},
            "retries": {t: sum(r.retries for r in side[t]) for t in side},
            "A": overall["A"], "B": overall["B"],
            "ratio": {name: _spread(per_round[name]) for name in RATIOS},
        })
    return rows


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f}"


def _errors_cell(errors: dict[str, int], removed: dict[str, list[list[int]]], rounds: int) -> str:
    def where(round_: int, index: int) -> str:
        return f"#{index}" if rounds == 1 else f"r{round_}#{index}"

    cells = []
    for kind, count in errors.items():
        shown = removed.get(kind, [])
        places = ", ".join(where(*p) for p in shown[:8]) + (", ..." if len(shown) > 8 else "")
        cells.append(f"{kind} x{count} ({places})")
    return "; ".join(cells) or "none"


def _ratio_cell(spread: dict) -> str:
    if spread["median"] is None:
        return "–"
    if spread["min"] == spread["max"]:
        return f"{spread['median']:.3f}"
    return f"{spread['median']:.3f} ({spread['min']:.3f}–{spread['max']:.3f})"


def markdown(settings: BenchSettings, rows: list[dict], compared: list[dict] | None = None,
             ranked: list[dict] | None = None) -> str:
    schema = settings.json_schema is not None
    targets = settings.targets()
    several = len(targets) > 1
    rounds = f", {settings.rounds} rounds" if settings.rounds > 1 else ""
    against = " and ".join(f"{t.label} {t.url}" if several else t.url for t in targets)
    lines = [
        f"# berth bench: {settings.scenario} against {against}",
        "",
        (f"{settings.requests} requests per model and concurrency{rounds}, max_tokens {settings.max_tokens}, "
         f"{'streaming' if settings.stream else 'not streaming'}. Times in ms; errors name the requests they "
         "removed (#place in the request list)."),
        "",
        ("| target " if several else "") + "| model | conc | ok | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 "
        "| TPOT p50 | E2E p50 | E2E p90 | E2E p99 | out tok/s | req/s | errors | retries |"
        + (" valid JSON |" if schema else ""),
        ("|---" if several else "") + "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
        + ("---:|" if schema else ""),
    ]
    for row in rows:
        rate = row["output_tokens_per_s"]
        rps = row["requests_per_s"]
        cells = ([row["target"]] if several else []) + [
            row["model"], str(row["concurrency"]), f"{row['succeeded']}/{row['requests']}",
            *(_ms(row["ttft_s"][f"p{p}"]) for p in PERCENTILES), _ms(row["itl_s"]["p50"]),
            _ms(row["itl_s"]["p99"]), _ms(row["tpot_s"]["p50"]),
            *(_ms(row["e2e_s"][f"p{p}"]) for p in PERCENTILES),
            "–" if rate is None else f"{rate:.1f}", "–" if rps is None else f"{rps:.2f}",
            _errors_cell(row["errors"], row["removed"], settings.rounds), str(row["retries"])]
        if schema:
            share = row.get("json_valid_share")
            cells.append("–" if share is None else f"{share:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    if compared:
        lines += [
            "",
            "## B against A (same request list, interleaved A, B per round)",
            "",
            ("Ratios B/A over the requests both answered; median over rounds (min–max). Below 1: B is faster "
             "(for tok/s: slower)."),
            "",
            ("| model | conc | pairs | TTFT p50 A / B | TTFT B/A | ITL mean B/A | E2E B/A | tok/s B/A | removed A "
             "| removed B |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for row in compared:
            removed = [_errors_cell({k: len(v) for k, v in row["removed"][t].items()}, row["removed"][t],
                                    settings.rounds) for t in ("A", "B")]
            lines.append("| " + " | ".join([
                row["model"], str(row["concurrency"]), f"{row['pairs']}/{row['requests']['A']}",
                f"{_ms(row['A']['ttft_p50'])} / {_ms(row['B']['ttft_p50'])}",
                *(_ratio_cell(row["ratio"][name]) for name in RATIOS), *removed]) + " |")
    text = "\n".join(lines) + "\n"
    return text + "\n" + choice.markdown(settings, ranked) if ranked else text


def plots(records: list[RequestRecord], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    several = len({r.target for r in records}) > 1

    def name(target: str, model: str) -> str:
        return f"{target}: {model}" if several else model

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for target, model, concurrency in dict.fromkeys((r.target, r.model, r.concurrency) for r in records):
        ok = [r for r in records if r.ok and (r.target, r.model, r.concurrency) == (target, model, concurrency)]
        label = f"{name(target, model)} c={concurrency}"
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
    for target, model in dict.fromkeys((row["target"], row["model"]) for row in rows):
        points = sorted((row["concurrency"], row["output_tokens_per_s"] or 0) for row in rows
                        if (row["target"], row["model"]) == (target, model))
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=name(target, model))
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput by concurrency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def choosing(settings: BenchSettings) -> bool:
    """Whether the run is one to choose a model by (images, or scores in the answers): per-image table,
    ranking, score distributions."""
    return bool(settings.images) or settings.score_field is not None


def results(settings: BenchSettings, records: list[RequestRecord]) -> dict:
    """What results.json holds: the settings, the targets, every request, the summary and, with two
    targets, the comparison."""
    shown = {k: v for k, v in asdict(settings).items() if k not in ("api_key", "prompts", "images")}
    shown["images"] = [{"name": i.name, "sent_as": i.media_type, "converted_from": i.converted_from}
                       for i in settings.images]
    found = {"settings": shown,
             "targets": {t.label: {"url": t.url, "models": list(t.models)} for t in settings.targets()},
             "prompts": len(settings.prompts), "summary": summarize(records),
             "requests": [r.as_dict() for r in records]}
    if settings.compare_url is not None:
        found["compare"] = compare(records)
    if settings.prompt_source == "built-in":  # a user's own prompts stay theirs; berth's set is recorded
        found["built_in_prompts"] = list(settings.prompts)
    return found


def write(settings: BenchSettings, records: list[RequestRecord], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    found = results(settings, records)
    if choosing(settings):
        found.update(choice.write(settings, records, out))
    (out / "results.json").write_text(json.dumps(found, indent=1))
    (out / "summary.md").write_text(markdown(settings, found["summary"], found.get("compare"), found.get("ranking")))
    plots(records, found["summary"], out)
    return found
