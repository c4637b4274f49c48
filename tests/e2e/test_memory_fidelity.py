"""The memory estimate against llama.cpp's own buffer sizes on the real binary (bench/memory_fidelity.py
--quick: every value of every axis once, over Gemma 3 270M (alone and with a Gemma-3-style vision
projector), SmolLM2 135M, a tiny dense llama and a tiny mixture of experts), and `berth fit` against
llama.cpp for Gemma 3 270M at -c 32768 with default flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import llama_server_binary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import memory_fidelity  # noqa: E402

from berth.store import ModelStore  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory, smollm2_home) -> list[dict]:
    binary = llama_server_binary()
    return memory_fidelity.compare(binary, tmp_path_factory.mktemp("fidelity"), quick=True, gpu=False,
                                   store=ModelStore(Path(smollm2_home) / "models"))


def test_every_component_is_within_tolerance(rows):
    assert {r["model"] for r in rows} == {"gemma-3-270m", "gemma-3-270m+mmproj", "smollm2-135m", "tiny-llama",
                                          "tiny-moe"}
    # the projector's encoder was sized by llama.cpp with and without flash attention (the scores of
    # all heads make it nine times larger without)
    projector = {"-fa off" in r["flags"]: r["real"].get("projector_compute", 0) for r in rows
                 if r["model"] == "gemma-3-270m+mmproj"}
    assert projector[True] > 5 * projector[False] > 0
    flag_sets = {r["flags"] for r in rows}
    for axis in ("-fa auto", "-fa off", "-ctk q8_0", "-np 1", "-np 4", "-c 512", "-c 4096", "-c 32768"):
        assert any(axis in flags for flags in flag_sets), axis  # every value of every axis ran
    assert any("-np" not in flags for flags in flag_sets)  # and -np auto
    misses = [f"{r['model']} {r['flags']} {kind}: {memory_fidelity.off_by(r, kind):+.1%}"
              for r in rows for kind, tolerance in memory_fidelity.TOLERANCE.items()
              if abs(memory_fidelity.off_by(r, kind)) > tolerance]
    assert not misses, "\n" + memory_fidelity.table(rows)


def test_berth_fit_agrees_with_llama_cpp_at_its_defaults(rows, gemma_gguf):
    """`berth fit -c 32768` (np auto, flash attention auto) against llama-server's figures for the same."""
    (real,) = [r["real"] for r in rows if r["model"] == "gemma-3-270m" and r["flags"].startswith("-c 32768 -fa auto")
               and "-np" not in r["flags"] and "q8_0" not in r["flags"]]
    fit = subprocess.run([sys.executable, "-m", "berth.cli", "fit", gemma_gguf, "--ctx", "32768", "--json"],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert fit.returncode == 0, fit.stderr
    host = json.loads(fit.stdout)["devices"]["host"]
    for kind in memory_fidelity.MODEL_KINDS:
        tolerance = memory_fidelity.TOLERANCE[kind]
        ours = host[f"{kind}_bytes"]
        assert abs(ours - real[kind]) <= max(tolerance * real[kind], memory_fidelity.ROUNDING), (kind, ours, real)
