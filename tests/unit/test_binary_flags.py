"""Reading which flags a llama-server takes from its --help, once per binary, and what a refused flag
becomes. The help text here has llama.cpp's layout (common/arg.cpp's printer: spellings at column 0
separated by commas, a value hint, the description from column 40, continued on indented lines)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from berth.engine import binary_flags as module
from berth.engine.binary_flags import binary_flags, parse_help
from berth.engine.llama_args import LlamaServerArgs

HELP = "\n".join([
    "----- common params -----",
    "",
    "-h,    --help, --usage                  print usage and exit",
    "-c,    --ctx-size N                     size of the context",
    "                                        (env: LLAMA_ARG_CTX_SIZE)",
    "-lm,   --load-mode MODE                 how weights are loaded",
    "                                        - none: read into memory",
    "-fa,   --flash-attn [on|off|auto]       flash attention",
    "--spec-draft-model, -md, --model-draft FNAME",
    "                                        draft model for speculative decoding",
    "-kvu,  --kv-unified, -no-kvu, --no-kv-unified",
    "                                        one KV buffer for every sequence",
    "--draft, --draft-n, --draft-max N       the argument has been removed. use --spec-draft-n-max or",
    "                                        --spec-ngram-mod-n-max",
    "                                        (env: LLAMA_ARG_DRAFT_MAX)",
    "-m,    --model FNAME                    model path",
    "--port PORT                             port to listen on",
    "--host HOST                             address to listen on",
    "-a,    --alias STRING                   model name",
    "-ngl,  --gpu-layers, --n-gpu-layers N   layers on the GPU",
])


def test_every_spelling_is_read_and_removed_flags_carry_llama_cpps_hint():
    flags = parse_help("/opt/llama-server", HELP)
    for spelling in ("-h", "--help", "--usage", "-c", "--ctx-size", "-lm", "--load-mode", "-fa", "--flash-attn",
                     "--spec-draft-model", "-md", "--model-draft", "-kvu", "--no-kv-unified", "-ngl", "--n-gpu-layers"):
        assert spelling in flags.accepted, spelling
    assert not {"N", "MODE", "FNAME", "[on|off|auto]", "-", "(env:"} & flags.accepted
    assert flags.removed["--draft-max"] == "removed: use --spec-draft-n-max or --spec-ngram-mod-n-max"
    assert "--ctx-size" not in flags.removed


def test_refused_flags_name_what_replaced_them():
    flags = parse_help("/opt/llama-server", HELP)

    def refused(cmd: str) -> list[str]:
        return flags.refused(LlamaServerArgs.parse(["llama-server", *cmd.split()]))

    assert refused("-m x.gguf -c 4096 --load-mode none -fa on -ngl 99") == []
    # what the old flags meant together: --no-mmap alone none, --mlock alone mmap+mlock, both mlock
    assert refused("-m x.gguf --no-mmap --mlock") == [
        "--no-mmap --mlock (replaced by --load-mode: write --load-mode mlock)"]
    assert refused("-m x.gguf --no-mmap") == ["--no-mmap (replaced by --load-mode: write --load-mode none)"]
    assert refused("-m x.gguf --mlock") == ["--mlock (replaced by --load-mode: write --load-mode mmap+mlock)"]
    assert refused("--direct-io -m x.gguf") == ["--direct-io (renamed: write --load-mode dio)"]
    assert refused("--draft-max 8") == ["--draft-max (removed: use --spec-draft-n-max or --spec-ngram-mod-n-max)"]
    assert refused("--frobnicate 3") == ["--frobnicate (unknown to it; see `llama-server --help`)"]


def test_help_is_read_once_per_binary_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(module, "_CACHE", {})
    calls = tmp_path / "calls"
    binary = tmp_path / "llama-server"
    (tmp_path / "help.txt").write_text(HELP)
    binary.write_text(f"#!/bin/sh\necho run >> {calls}\ncat {tmp_path / 'help.txt'}\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)

    def runs() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    first = binary_flags(str(binary))
    assert first is not None and "--load-mode" in first.accepted and runs() == 1
    assert binary_flags(str(binary)) == first and runs() == 1  # in memory
    monkeypatch.setattr(module, "_CACHE", {})
    assert binary_flags(str(binary)) == first and runs() == 1  # on disk, for the next berth command
    (tmp_path / "help.txt").write_text(HELP.replace("-lm,   --load-mode MODE", "--no-mmap          "))
    os.utime(binary, ns=(binary.stat().st_atime_ns, binary.stat().st_mtime_ns + 10**9))  # a new build
    rebuilt = binary_flags(str(binary))
    assert runs() == 2 and rebuilt is not None and "--load-mode" not in rebuilt.accepted


@pytest.mark.parametrize("help_text", ["", "usage: something else\n-x  one flag\n"])
def test_a_program_that_is_not_llama_server_is_not_checked(tmp_path, monkeypatch, help_text):
    monkeypatch.setenv("BERTH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(module, "_CACHE", {})
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\nprintf '%s' '{help_text}'\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    assert binary_flags(str(binary)) is None
    assert binary_flags(str(Path(tmp_path / "missing"))) is None
