"""The one place that turns a model spec into the argv that is actually executed."""

from __future__ import annotations

import sys

from berth.config import ModelSpec
from berth.engine.binary import find_llama_server
from berth.engine.llama_args import ArgvError, LlamaServerArgs
from berth.errors import BadRequest
from berth.store.refs import ModelRef, parse_ref

BARE_LLAMA_SERVER = "llama-server"
HF_DEFAULT_QUANT = "Q4_K_M"  # what llama-server picks for `-hf owner/repo` without a tag


def worker_argv() -> list[str]:
    """How to run `berth worker` with this very interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "berth.cli", "worker"]


def _program(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """(the resolved program with its fixed leading args, the rest of the argv)."""
    program, rest = spec.argv[0], list(spec.argv[1:])
    if program == BARE_LLAMA_SERVER:
        binary = find_llama_server()
        return ([binary] if binary else worker_argv()), rest
    if program == "berth":
        return [sys.executable, "-m", "berth.cli"], rest
    return [program], rest


def store_reference(spec: ModelSpec) -> tuple[ModelRef, bool | None] | None:
    """The store model a spec needs, from `model:` or `-hf` in its cmd, with its projector wish.

    The projector wish is True (required), False, or None (if the repo has one, as `-hf` does).
    """
    if spec.model_ref:
        return parse_ref(spec.model_ref), spec.mmproj
    try:
        args = LlamaServerArgs.parse(spec.argv)
    except ArgvError:
        return None
    hf_repo = args.get("hf_repo")
    if not hf_repo:
        return None
    repo, _, quant = hf_repo.partition(":")
    hf_file = args.get("hf_file")
    ref = ModelRef(repo, filename=hf_file) if hf_file else ModelRef(repo, quant=quant or HF_DEFAULT_QUANT)
    parse_ref(str(ref))  # validates the repo name
    wants_mmproj = None if not (args.get("no_mmproj") or args.get("mmproj")) else False
    return ref, wants_mmproj


def build_launch_argv(spec: ModelSpec, store=None, fetch: bool = False) -> list[str]:
    """Resolve a model's cmd into the argv to execute.

    A bare `llama-server` becomes the binary `find_llama_server` picks, or the
    built-in worker when there is none; a bare `berth` is this berth; anything
    else, absolute paths included, runs as written. A model from the store
    (`model:` or `-hf` in cmd) is pulled first when `fetch` (else its stable
    path is shown as planned) and passed as a local `-m` path, so the model
    server never downloads at run time.
    """
    prefix, rest = _program(spec)
    wanted = store_reference(spec)
    if wanted is None:
        return [*prefix, *rest]
    ref, mmproj = wanted
    from berth.store import ModelStore
    from berth.store.pull import pull
    from berth.store.store import StoreEntry

    store = store or ModelStore.default()
    if fetch:
        entry = pull(store, ref, mmproj=mmproj)
        store.touch(entry)
    else:
        entry = store.entry(ref.default_name) or StoreEntry(ref.default_name, store.root / ref.default_name)
    try:
        args = LlamaServerArgs.parse(["program", *rest])
    except ArgvError as exc:
        raise BadRequest(f"cannot read the cmd of {spec.id}: {exc}") from None
    args.items = [item for item in args.items if item.spec is None or item.spec.dest not in ("hf_repo", "hf_file")]
    args.set("model", str(entry.launch_model_path))
    if entry.mmproj_path is not None and mmproj is not False:
        args.set("mmproj", str(entry.mmproj_path))
    return [*prefix, *args.to_argv()[1:]]
