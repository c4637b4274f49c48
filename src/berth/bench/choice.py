"""Choosing a model from a bench run over images (`--images`, `--score-field`): every answer per image, how
decisive each model's scores are, and the models ranked as someone choosing one reads them: answers that
parse first, then latency.

"Decisive" is a number: the share of a model's scored answers that tie at its highest score. A model that
gives half the album the top score picks nothing; one that gives it to one photo in twenty does.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

from berth.bench.runner import BenchSettings, RequestRecord
from berth.bench.stats import mean, percentile

CSV_COLUMNS = ("image", "model", "target", "round", "answer", "score", "valid_json", "latency_ms", "ttft_ms",
               "error")


def score_summary(scores: list[float]) -> dict:
    """How a model's scores spread: count, mean, median, range, distinct values, and the top score with the
    share of scored answers that tie at it."""
    if not scores:
        return {"scored": 0, "mean": None, "p50": None, "min": None, "max": None, "distinct": 0, "top": None,
                "ties_at_top": None, "ties_at_top_share": None, "counts": {}}
    top = max(scores)
    ties = sum(1 for s in scores if s == top)
    counts = Counter(scores)
    return {"scored": len(scores), "mean": mean(scores), "p50": percentile(scores, 50),
            "min": min(scores), "max": top, "distinct": len(counts), "top": top, "ties_at_top": ties,
            "ties_at_top_share": ties / len(scores), "counts": {f"{v:g}": n for v, n in sorted(counts.items())}}


def _ordered(settings: BenchSettings, records: list[RequestRecord]) -> list[RequestRecord]:
    """Records by target, model (as given), round and place in the request list: each model's images in the
    order they were sent."""
    model_order = {model: i for i, model in enumerate(settings.models)}
    return sorted(records, key=lambda r: (r.target, model_order.get(r.model, 0), r.round, r.index))


def per_image(settings: BenchSettings, records: list[RequestRecord]) -> list[dict]:
    """One row per request: the image, the model, what it answered, the score in it, and the latency."""
    return [{"image": r.image, "model": r.model, "target": r.target, "round": r.round, "index": r.index,
             "answer": r.answer, "score": r.score, "valid_json": r.json_valid, "latency_s": r.e2e_s if r.ok else None,
             "ttft_s": r.ttft_s, "error": r.error}
            for r in _ordered(settings, records)]


def ranking(settings: BenchSettings, records: list[RequestRecord]) -> list[dict]:
    """Per (target, model), over all its requests: the share whose answer parsed and validated (an error
    counts as an answer that did not), end-to-end latency, errors, scores; ranked by that share (with a
    schema), then by the p50."""
    rows = []
    schema = settings.json_schema is not None
    for target, model in dict.fromkeys((r.target, r.model) for r in _ordered(settings, records)):
        group = [r for r in records if (r.target, r.model) == (target, model)]
        ok = [r for r in group if r.ok]
        latencies = [r.e2e_s for r in ok]
        parsed = sum(1 for r in group if r.json_valid)
        row = {"target": target, "model": model, "requests": len(group), "succeeded": len(ok),
               "errors": dict(Counter(r.error for r in group if not r.ok)),
               "parsed": parsed if schema else None, "parse_rate": parsed / len(group) if schema else None,
               "e2e_p50_s": percentile(latencies, 50), "e2e_p90_s": percentile(latencies, 90),
               "ttft_p50_s": percentile([r.ttft_s for r in ok if r.ttft_s is not None], 50)}
        if settings.score_field:
            row["score"] = score_summary([r.score for r in ok if r.score is not None])
        rows.append(row)

    def key(row: dict) -> tuple[float, float]:
        p50 = row["e2e_p50_s"]
        return (-(row["parse_rate"] or 0.0), p50 if p50 is not None else math.inf)

    ranked = sorted(rows, key=key)  # stable: models that tie keep the order they were given in
    for place, row in enumerate(ranked, 1):
        row["rank"] = place
    return ranked


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f}"


def markdown(settings: BenchSettings, ranked: list[dict]) -> str:
    """The ranking, with the score columns when scores were asked for."""
    several = len({row["target"] for row in ranked}) > 1
    scored = settings.score_field is not None
    order = "parse rate, then p50 latency" if settings.json_schema is not None else "p50 latency"
    lines = [f"## Models ranked ({order})", ""]
    if settings.images:
        lines += [f"{len(settings.images)} images, the same order for every model; every answer with its score "
                  "and latency is in per_image.csv" + (" (score distributions: scores.png)" if scored else "") + ".",
                  ""]
    header = ["rank", *(["target"] if several else []), "model", "parsed", "E2E p50 ms", "E2E p90 ms",
              "TTFT p50 ms", "errors"]
    if scored:
        header += [f"{settings.score_field}: mean", "distinct", "top", "ties at top"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ranked:
        parsed = "–" if row["parse_rate"] is None else f"{row['parse_rate']:.0%} ({row['parsed']}/{row['requests']})"
        errors = ", ".join(f"{kind} x{n}" for kind, n in row["errors"].items()) or "none"
        cells = [str(row["rank"]), *([row["target"]] if several else []), row["model"], parsed,
                 _ms(row["e2e_p50_s"]), _ms(row["e2e_p90_s"]), _ms(row["ttft_p50_s"]), errors]
        if scored:
            score = row["score"]
            if score["scored"]:
                cells += [f"{score['mean']:.2f}", str(score["distinct"]), f"{score['top']:g}",
                          f"{score['ties_at_top_share']:.0%} ({score['ties_at_top']}/{score['scored']})"]
            else:
                cells += ["–", "0", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row["image"] or "", row["model"], row["target"], row["round"], row["answer"] or "",
                             "" if row["score"] is None else f"{row['score']:g}",
                             "" if row["valid_json"] is None else str(row["valid_json"]).lower(),
                             "" if row["latency_s"] is None else f"{row['latency_s'] * 1000:.1f}",
                             "" if row["ttft_s"] is None else f"{row['ttft_s'] * 1000:.1f}", row["error"] or ""])
    return path


def histogram(settings: BenchSettings, ranked: list[dict], path: Path) -> Path:
    """One panel per model (in rank order): how many answers gave each score, the top score's bar marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    several = len({row["target"] for row in ranked}) > 1
    fig, axes = plt.subplots(len(ranked), 1, figsize=(7, 2.4 * len(ranked)), squeeze=False, sharex=True)
    for ax, row in zip(axes[:, 0], ranked, strict=True):
        score = row["score"]
        values = [float(v) for v in score["counts"]]
        counts = list(score["counts"].values())
        width = min((b - a for a, b in zip(values, values[1:])), default=1.0) * 0.8
        bars = ax.bar(values, counts, width=width, color="#0969da")
        if score["top"] is not None:
            bars[values.index(score["top"])].set_color("#cf222e")
        name = f"{row['target']}: {row['model']}" if several else row["model"]
        tied = (f"top {score['top']:g}: {score['ties_at_top']} of {score['scored']} ({score['ties_at_top_share']:.0%})"
                if score["scored"] else "no scores")
        ax.set_title(f"{name} — {tied}", fontsize=9)
        ax.set_ylabel("answers")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel(str(settings.score_field))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(settings: BenchSettings, records: list[RequestRecord], out: Path) -> dict:
    """per_image.csv and scores.png in `out`; what results.json adds: the per-image table and the ranking."""
    rows = per_image(settings, records)
    ranked = ranking(settings, records)
    write_csv(rows, out / "per_image.csv")
    if settings.score_field:
        histogram(settings, ranked, out / "scores.png")
    return {"per_image": rows, "ranking": ranked}
