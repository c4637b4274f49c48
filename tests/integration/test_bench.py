"""`berth bench` against a real berth (and a bare server) fronting fake model servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import fake_cmd, free_port, healthy, start_log_lines, wait_until

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def config(start_port: int, tmp_path: Path, flags_a: str = "", flags_b: str = "", extra: str = "") -> str:
    log = tmp_path / "starts.log"
    return f"""
startPort: {start_port}
{extra}
models:
  a:
    cmd: {fake_cmd('a', '--start-log', str(log), *flags_a.split())}
    memory: {{ram: 1GiB}}
  b:
    cmd: {fake_cmd('b', '--start-log', str(log), *flags_b.split())}
    memory: {{ram: 1GiB}}
"""


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_warm_sweep_reports_latency_throughput_errors_and_plots(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, flags_b="--error-every 3"))
    out = tmp_path / "out"
    run = bench("--url", b.url + "/v1", "--model", "a", "--model", "b", "--requests", "6", "--concurrency", "1,3",
                "--prompt", "hi", "--max-tokens", "8", "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = {(r["model"], r["concurrency"]): r for r in results(out)["summary"]}
    assert set(rows) == {("a", 1), ("a", 3), ("b", 1), ("b", 3)}
    for row in rows.values():
        assert row["requests"] == 6
        assert row["ttft_s"]["p50"] <= row["e2e_s"]["p50"] <= row["e2e_s"]["p99"]
        assert row["ttft_s"]["p50"] <= row["ttft_s"]["p90"] <= row["ttft_s"]["p99"]
        assert row["output_tokens"] == 5 * row["succeeded"]  # the fake streams 5 tokens and reports them in usage
        assert row["output_tokens_per_s"] > 0 and row["requests_per_s"] > 0
        assert row["itl_s"]["p50"] is not None and row["tpot_s"]["p50"] is not None
    assert rows[("a", 1)]["succeeded"] == 6 and rows[("a", 1)]["errors"] == {}
    # b fails every third request it sees (its warm-up request included): 2 of 6 in each phase
    assert rows[("b", 1)]["errors"] == {"fake_overload": 2} and rows[("b", 1)]["succeeded"] == 4
    assert len(results(out)["requests"]) == 24
    for name in ("latency.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| model | conc | ok | TTFT p50" in summary and "| b | 3 | 4/6 |" in summary
    assert "fake_overload x2" in summary


def test_json_schema_share_is_the_share_that_validates(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, flags_a="--invalid-json-every 2"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = tmp_path / "out"
    run = bench("--url", b.url, "--model", "a", "--requests", "4", "--prompt", "answer", "--json-schema", str(schema),
                "--no-stream", "--out", str(out))
    assert run.returncode == 0, run.stderr
    [row] = results(out)["summary"]
    # requests 2..5 after the warm-up: 2 and 4 break the schema
    assert row["json_valid_share"] == 0.5
    assert "valid JSON" in (out / "summary.md").read_text()


def test_cold_scenario_unloads_before_every_request(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path))
    out = tmp_path / "out"
    run = bench("--url", b.url, "--model", "a", "--requests", "3", "--prompt", "hi", "--scenario", "cold",
                "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")] == ["a", "a", "a"]
    [row] = results(out)["summary"]
    assert row["scenario"] == "cold" and row["succeeded"] == 3


def test_swap_scenario_alternates_models(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path, extra="memory: {scheduling: false}"))
    out = tmp_path / "out"
    run = bench("--url", b.url, "--model", "a", "--model", "b", "--requests", "2", "--prompt", "hi",
                "--scenario", "swap", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in start_log_lines(tmp_path / "starts.log")] == ["a", "b", "a", "b"]
    assert [r["model"] for r in results(out)["requests"]] == ["a", "b", "a", "b"]


@pytest.fixture
def bare_server():
    """A model server that is not berth (the fake one, alone on a free port): yields its URL."""
    port = free_port()
    server = subprocess.Popen(fake_cmd("bare").replace("${PORT}", str(port)).split(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 20, "fake server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def test_bench_works_against_a_server_that_is_not_berth(bare_server, tmp_path):
    out = tmp_path / "out"
    run = bench("--url", bare_server, "--model", "anything", "--requests", "3", "--prompt", "hi", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert results(out)["summary"][0]["succeeded"] == 3


def test_bench_without_prompt_flags_sends_the_built_in_prompts_and_records_them(bare_server, tmp_path):
    from berth.bench.prompts import BUILT_IN

    out = tmp_path / "out"
    run = bench("--url", bare_server, "--model", "m", "--requests", str(len(BUILT_IN)), "--out", str(out))
    assert run.returncode == 0, run.stderr
    found = results(out)
    assert found["built_in_prompts"] == BUILT_IN and found["settings"]["prompt_source"] == "built-in"
    sent = sorted(r["prompt_tokens"] for r in found["requests"])
    assert sent == sorted(len(p.split()) for p in BUILT_IN)  # each prompt once: short and long
    assert max(sent) > 100 > min(sent)


def test_bad_bench_input_names_the_problem(berth, start_port, tmp_path):
    b = berth(config(start_port, tmp_path))
    out = str(tmp_path / "out")
    cases = [
        (["--url", b.url, "--model", "a", "--prompt", "x", "--scenario", "swap"], "at least twice"),
        (["--url", b.url, "--model", "nope", "--prompt", "x"], "not served"),
        (["--url", "http://127.0.0.1:9", "--model", "a", "--prompt", "x"], "check --url"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--prompt-file", str(tmp_path / "p.txt")], "not both"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--concurrency", "0"], "positive numbers"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--scenario", "cold", "--concurrency", "4"],
         "drop --concurrency"),
    ]
    cases += [
        (["--url", b.url, "--model", "a", "--prompt", "x", "--compare-model", "b"], "give --compare"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--compare", b.url, "--compare-model", "a",
          "--compare-model", "b"], "once per --model"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--compare", "ftp://127.0.0.1:9"], "must start with http"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--compare", "http://127.0.0.1:9"], "check --compare"),
        (["--url", b.url, "--model", "a", "--prompt", "x", "--compare", b.url, "--compare-model", "nope"],
         "not served"),
    ]
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text('{"type": "no-such-type"}')
    cases.append((["--url", b.url, "--model", "a", "--prompt", "x", "--json-schema", str(bad_schema)],
                  "not a valid JSON Schema"))
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps({"type": "object", "properties": {"score": {"type": "integer"},
                                                                   "why": {"type": "string"}}}))
    not_images = tmp_path / "not-images"
    not_images.mkdir()
    (not_images / "a.txt").write_text("x")
    (not_images / "broken.png").write_bytes(b"\x89PNG but not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases += [
        (["--url", b.url, "--model", "a", "--images", str(tmp_path / "nowhere")], "is not a directory"),
        (["--url", b.url, "--model", "a", "--images", str(empty)], "has no .jpg, .jpeg, .png, .webp files"),
        (["--url", b.url, "--model", "a", "--images", str(not_images)], "broken.png is not a readable image"),
        (["--url", b.url, "--model", "a", "--json-schema", str(scored), "--score-field", "rating"],
         "not a property of --json-schema"),
        (["--url", b.url, "--model", "a", "--json-schema", str(scored), "--score-field", "why"],
         "must be a number or an integer"),
    ]
    for args, message in cases:
        run = bench(*args, "--out", out)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr, (args, run.stderr)
    assert start_log_lines(tmp_path / "starts.log") == []  # nothing was sent


def test_aliases_and_unlisted_names_the_target_routes_are_accepted(berth, start_port, tmp_path):
    """`--model default` as the README writes it: berth lists the alias under meta.llamaswap.aliases, and an
    unlisted model is not in /v1/models at all, so bench asks the target instead of refusing the name."""
    log = tmp_path / "starts.log"
    b = berth(f"""
startPort: {start_port}
models:
  a:
    cmd: {fake_cmd('a', '--start-log', str(log))}
    aliases: [default]
  hidden:
    cmd: {fake_cmd('hidden', '--start-log', str(log))}
    unlisted: true
""")
    out = tmp_path / "out"
    run = bench("--url", b.url, "--model", "default", "--model", "hidden", "--requests", "2", "--prompt", "hi",
                "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = {row["model"]: row for row in results(out)["summary"]}
    assert rows["default"]["succeeded"] == 2 and rows["hidden"]["succeeded"] == 2
    assert {line.split()[0] for line in start_log_lines(log)} == {"a", "hidden"}  # the alias reached a


def test_connections_the_server_closes_after_an_answer_are_retried_and_counted_not_errors(stand_in, tmp_path):
    """llama-server closes the connection after every streamed answer while announcing keep-alive; the
    stand-in does the same unless --keep-streams-open, the control."""
    for flags, closes in (((), True), (("--keep-streams-open",), False)):
        out = tmp_path / f"out-{closes}"
        run = bench("--url", stand_in("--token-ms", "0.2", *flags), "--model", "gpu-speed", "--requests", "20",
                    "--concurrency", "1,4", "--prompt", "hi", "--max-tokens", "4", "--out", str(out))
        assert run.returncode == 0, run.stderr
        rows = results(out)["summary"]
        assert [(row["succeeded"], row["errors"]) for row in rows] == [(20, {}), (20, {})], flags
        retries = sum(row["retries"] for row in rows)
        assert retries > 0 if closes else retries == 0, (flags, retries)
        assert sum(r["retries"] for r in results(out)["requests"]) == retries
        assert "| retries |" in (out / "summary.md").read_text()


def test_compare_sends_both_targets_the_same_request_list_interleaved_and_prints_ratios(berth, start_port, tmp_path,
                                                                                        stand_in):
    first = stand_in("--token-ms", "2")
    b = berth(config(start_port, tmp_path, flags_a="--error-every 5"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"one"\n"one two"\n"one two three"\n')  # the servers count words as prompt tokens
    out = tmp_path / "out"
    run = bench("--url", first, "--model", "gpu-speed", "--compare", b.url, "--compare-model", "a",
                "--requests", "4", "--rounds", "3", "--concurrency", "1,2", "--prompt-file", str(prompts),
                "--max-tokens", "4", "--out", str(out))
    assert run.returncode == 0, run.stderr
    found = results(out)
    assert found["targets"] == {"A": {"url": first, "models": ["gpu-speed"]}, "B": {"url": b.url, "models": ["a"]}}
    sent = {t: {(r["concurrency"], r["round"], r["index"]): r for r in found["requests"] if r["target"] == t}
            for t in "AB"}
    expected = {(c, round_, i) for c in (1, 2) for round_ in range(3) for i in range(4)}
    assert sent["A"].keys() == sent["B"].keys() == expected
    for key, a in sent["A"].items():
        other = sent["B"][key]
        assert a["prompt_index"] == other["prompt_index"] == key[2] % 3
        if other["ok"]:  # each server reports the words it was sent: the same prompt reached both
            assert a["prompt_tokens"] == other["prompt_tokens"] == key[2] % 3 + 1
    for c in (1, 2):  # A's block, then B's, round after round
        blocks = [[r for r in sent[t].values() if r["concurrency"] == c and r["round"] == round_]
                  for round_ in range(3) for t in "AB"]
        spans = [(min(r["started"] for r in block), max(r["started"] + r["e2e_s"] for r in block)) for block in blocks]
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), spans
    for row in found["compare"]:
        c = row["concurrency"]
        failed = sorted([key[1], key[2]] for key, r in sent["B"].items() if key[0] == c and not r["ok"])
        assert failed and row["removed"] == {"A": {}, "B": {"fake_overload": failed}}  # a fails every 5th request
        assert row["pairs"] == 12 - len(failed)
        for name in ("ttft_p50", "itl_mean", "e2e_p50", "output_tokens_per_s"):
            spread = row["ratio"][name]
            assert len(spread["rounds"]) == 3 and spread["min"] <= spread["median"] <= spread["max"], (name, spread)
    summary = (out / "summary.md").read_text()
    assert "| model | conc | pairs | TTFT p50 A / B | TTFT B/A | ITL mean B/A | E2E B/A | tok/s B/A |" in summary
    assert "| target | model | conc | ok |" in summary and "fake_overload x" in summary
