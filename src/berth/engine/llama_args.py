"""llama-server command lines <-> a typed description.

One table (`FLAGS`) says, for every llama-server flag berth knows, its
spellings, whether it takes a value, the value's type, and whether berth's
built-in worker implements it. `LlamaServerArgs.parse` reads an argv with it,
keeping every argument in order (flags berth does not know pass through
untouched), and `to_argv` writes it back; the memory planner and the worker
read settings through `get`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

FLASH_ATTN_VALUES = {"on", "off", "auto", "true", "false", "1", "0", "enabled", "disabled"}
# common/arg.cpp, --load-mode: how the weights are read (11434 replaced --no-mmap and --mlock with it)
LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")


@dataclass(frozen=True)
class FlagSpec:
    names: tuple[str, ...]
    dest: str
    kind: type = str  # int, float, str for flags with a value; bool for switches
    worker: bool = False  # implemented by `berth worker`
    optional_value: bool = False  # `-fa` alone or `-fa on`
    repeatable: bool = False  # `-ot a=CPU -ot b=CPU`
    negates: str | None = None  # for `--no-x` switches: the dest they turn off
    placement: bool = False  # where the server listens or saves, what it is called: not what it holds
    secret: bool = False  # its value is never logged or printed
    choices: tuple[str, ...] = ()  # the values llama.cpp accepts, when it takes only these

    @property
    def takes_value(self) -> bool:
        return self.kind is not bool


AUTO_PARALLEL = 4  # llama-server's `-np` when none is given


def _f(names: str, dest: str, kind: type = str, **kw: Any) -> FlagSpec:
    return FlagSpec(tuple(names.split()), dest, kind, **kw)


# --api-key's environment variable (llama.cpp common/arg.cpp: `.set_env("LLAMA_API_KEY")`); its keys come
# before those of --api-key, and `berth worker` reads it the same way
SERVER_KEY_ENV = "LLAMA_API_KEY"

FLAGS: tuple[FlagSpec, ...] = (
    # implemented by the built-in worker
    _f("-m --model", "model", worker=True),
    _f("--host", "host", worker=True, placement=True),
    _f("--port", "port", int, worker=True, placement=True),
    _f("-c --ctx-size", "ctx_size", int, worker=True),
    _f("-np --parallel", "parallel", int, worker=True),
    _f("-ngl --n-gpu-layers --gpu-layers", "n_gpu_layers", str, worker=True),  # a number, "auto" or "all"
    _f("-b --batch-size", "batch_size", int, worker=True),
    _f("-ub --ubatch-size", "ubatch_size", int, worker=True),
    _f("-t --threads", "threads", int, worker=True),
    _f("-tb --threads-batch", "threads_batch", int, worker=True),
    _f("-ctk --cache-type-k", "cache_type_k", worker=True),
    _f("-ctv --cache-type-v", "cache_type_v", worker=True),
    _f("-fa --flash-attn", "flash_attn", worker=True, optional_value=True),
    _f("--jinja", "jinja", bool, worker=True),
    _f("--no-jinja", "no_jinja", bool, worker=True, negates="jinja"),
    _f("-mm --mmproj", "mmproj", worker=True),
    _f("-lm --load-mode", "load_mode", worker=True, choices=LOAD_MODES),
    # what --load-mode replaced: older builds (and the built-in worker) take them
    _f("--no-mmap", "no_mmap", bool, worker=True),
    _f("--mlock", "mlock", bool, worker=True),
    _f("-a --alias", "alias", worker=True, placement=True),
    _f("--api-key", "api_key", worker=True, placement=True, secret=True),
    _f("--metrics", "metrics", bool, worker=True),
    _f("--slots", "slots", bool, worker=True),
    _f("--no-slots", "no_slots", bool, worker=True, negates="slots"),
    _f("--slot-save-path", "slot_save_path", worker=True, placement=True),
    _f("--swa-full", "swa_full", bool, worker=True),
    _f("--embedding --embeddings", "embeddings", bool, worker=True),
    _f("--temp", "temp", float, worker=True),
    _f("--top-k", "top_k", int, worker=True),
    _f("--top-p", "top_p", float, worker=True),
    _f("--min-p", "min_p", float, worker=True),
    _f("--repeat-penalty", "repeat_penalty", float, worker=True),
    _f("--presence-penalty", "presence_penalty", float, worker=True),
    _f("--frequency-penalty", "frequency_penalty", float, worker=True),
    _f("-ot --override-tensor", "override_tensor", worker=True, repeatable=True),
    _f("-ncmoe --n-cpu-moe", "n_cpu_moe", int, worker=True),
    _f("-cmoe --cpu-moe", "cpu_moe", bool, worker=True),
    _f("--no-warmup", "no_warmup", bool, worker=True),
    _f("--chat-template", "chat_template", worker=True),
    _f("--pooling", "pooling", worker=True),
    # known to llama-server, passed through by the binary engine only
    _f("-mu --model-url", "model_url"),
    _f("-hf -hfr --hf-repo", "hf_repo"),
    _f("-hff --hf-file", "hf_file"),
    _f("-hft --hf-token", "hf_token", secret=True),
    _f("-n --predict --n-predict", "n_predict", int),
    _f("-sm --split-mode", "split_mode"),
    _f("-ts --tensor-split", "tensor_split"),
    _f("-mg --main-gpu", "main_gpu", int),
    _f("-dev --device", "device"),
    _f("--rpc", "rpc"),  # comma-separated host:port of ggml-rpc-servers; must precede -ot naming them
    _f("--api-key-file", "api_key_file", placement=True),
    _f("--ssl-key-file", "ssl_key_file", placement=True, secret=True),
    _f("--ssl-cert-file", "ssl_cert_file", placement=True),
    _f("-s --seed", "seed", int),
    _f("-fit --fit", "fit"),
    _f("-fitc --fit-ctx", "fit_ctx", int),
    _f("-fitt --fit-target", "fit_target"),
    _f("--cache-reuse", "cache_reuse", int),
    _f("--chat-template-file", "chat_template_file"),
    _f("--reasoning-format", "reasoning_format"),
    _f("--reasoning-budget", "reasoning_budget", int),
    _f("--rope-scaling", "rope_scaling"),
    _f("--rope-freq-base", "rope_freq_base", float),
    _f("--rope-freq-scale", "rope_freq_scale", float),
    _f("--yarn-orig-ctx", "yarn_orig_ctx", int),
    _f("-to --timeout", "timeout", int),
    _f("--threads-http", "threads_http", int),
    _f("-md --model-draft", "model_draft"),
    _f("-ngld --n-gpu-layers-draft --gpu-layers-draft", "n_gpu_layers_draft"),
    _f("--draft-max --draft --draft-n", "draft_max", int),
    _f("--draft-min --draft-n-min", "draft_min", int),
    _f("--lora", "lora", repeatable=True),
    _f("--grammar-file", "grammar_file"),
    _f("--keep", "keep", int),
    _f("--path", "static_path"),
    _f("--log-file", "log_file"),
    _f("-cram --cache-ram", "cache_ram", int),
    _f("--ctx-checkpoints --swa-checkpoints", "ctx_checkpoints", int),
    _f("--sleep-idle-seconds", "sleep_idle_seconds", int),
    _f("--image-min-tokens", "image_min_tokens", int),
    _f("--image-max-tokens", "image_max_tokens", int),
    _f("--models-preset", "models_preset"),
    _f("--models-max", "models_max", int),
    _f("--models-dir", "models_dir"),
    _f("--mmap", "mmap", bool),
    _f("--no-context-shift", "no_context_shift", bool),
    _f("--context-shift", "context_shift", bool),
    _f("--repack", "repack", bool),
    _f("-nr --no-repack", "no_repack", bool, negates="repack"),
    _f("--op-offload", "op_offload", bool),
    _f("--no-op-offload", "no_op_offload", bool, negates="op_offload"),
    _f("-kvu --kv-unified", "kv_unified", bool),
    _f("-no-kvu --no-kv-unified", "no_kv_unified", bool, negates="kv_unified"),
    _f("-cb --cont-batching", "cont_batching", bool),
    _f("-nocb --no-cont-batching", "no_cont_batching", bool),
    _f("-v --verbose", "verbose", bool),
    _f("--log-disable", "log_disable", bool),
    _f("--no-webui", "no_webui", bool),
    _f("--webui", "webui", bool),
    _f("--check-tensors", "check_tensors", bool),
    _f("-mmu --mmproj-url", "mmproj_url"),  # llama-server downloads the projector itself
    _f("--no-mmproj", "no_mmproj", bool),
    _f("--no-mmproj-offload", "no_mmproj_offload", bool),
    _f("--offline", "offline", bool),
    _f("--reranking --rerank", "reranking", bool),
    _f("-sp --special", "special", bool),
    _f("--no-perf", "no_perf", bool),
    # idle seconds before the server frees its model and keeps running (-1: never); what it holds awake is the same
    _f("--sleep-idle-seconds", "sleep_idle_seconds", int, placement=True),
)

_BY_NAME: dict[str, FlagSpec] = {name: spec for spec in FLAGS for name in spec.names}
_BY_DEST: dict[str, FlagSpec] = {spec.dest: spec for spec in FLAGS}


class ArgvError(ValueError):
    """An argv that cannot be read: names the flag and what is wrong."""


@dataclass
class ArgItem:
    """One argument as written: a flag (known or not) with its value, or a positional."""

    spelled: str  # the flag as the user wrote it ("-c", "--ctx-size"), or a positional
    spec: FlagSpec | None
    value: str | None = None
    inline: bool = False  # written as --flag=value

    def to_argv(self) -> list[str]:
        if self.value is None:
            return [self.spelled]
        if self.inline:
            return [f"{self.spelled}={self.value}"]
        return [self.spelled, self.value]


def _looks_like_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:
        float(token)
        return True
    except ValueError:
        return False


@dataclass
class LlamaServerArgs:
    program: str
    items: list[ArgItem]

    @classmethod
    def parse(cls, argv: list[str] | tuple[str, ...]) -> "LlamaServerArgs":
        """Read a llama-server argv (program first).

        A flag berth does not know takes the next token as its value when that
        token does not look like a flag; this keeps such flags intact when the
        argv is written back.
        """
        if not argv:
            raise ArgvError("empty command line")
        items: list[ArgItem] = []
        tokens = list(argv[1:])
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if not token.startswith("-") or token == "-":
                items.append(ArgItem(token, None))
                continue
            name, eq, inline_value = token.partition("=")
            if eq:
                items.append(ArgItem(name, _BY_NAME.get(name), inline_value, inline=True))
                continue
            spec = _BY_NAME.get(token)
            if spec is None:
                if i < len(tokens) and _looks_like_value(tokens[i]):
                    items.append(ArgItem(token, None, tokens[i]))
                    i += 1
                else:
                    items.append(ArgItem(token, None))
                continue
            if not spec.takes_value:
                items.append(ArgItem(token, spec))
            elif spec.optional_value:
                if i < len(tokens) and tokens[i].lower() in FLASH_ATTN_VALUES:
                    items.append(ArgItem(token, spec, tokens[i]))
                    i += 1
                else:
                    items.append(ArgItem(token, spec))
            else:
                if i >= len(tokens):
                    raise ArgvError(f"{token} needs a value")
                items.append(ArgItem(token, spec, tokens[i]))
                i += 1
        args = cls(argv[0], items)
        args._check_types()
        return args

    def _check_types(self) -> None:
        for item in self.items:
            if item.spec is None or item.value is None or item.spec.kind is bool:
                continue
            if item.value.startswith("${") and item.value.endswith("}"):
                continue  # a macro bound at launch (`--port ${PORT}`); checked once it has its value
            if item.spec.choices and item.value not in item.spec.choices:
                raise ArgvError(f"{item.spelled} expects one of {', '.join(item.spec.choices)}, got {item.value!r}")
            if item.spec.kind is str:
                continue
            try:
                item.spec.kind(item.value)
            except ValueError:
                kind = "an integer" if item.spec.kind is int else "a number"
                raise ArgvError(f"{item.spelled} expects {kind}, got {item.value!r}") from None

    def to_argv(self) -> list[str]:
        out = [self.program]
        for item in self.items:
            out.extend(item.to_argv())
        return out

    # -- typed access ------------------------------------------------------------

    def _items_for(self, dest: str) -> list[ArgItem]:
        return [item for item in self.items if item.spec is not None and item.spec.dest == dest]

    def get(self, dest: str, default: Any = None) -> Any:
        """The typed value of a flag (last one wins; switches give True; repeatable flags give a list)."""
        spec = _BY_DEST[dest]
        found = self._items_for(dest)
        if spec.repeatable:
            return [item.value for item in found]
        negators = [s.dest for s in FLAGS if s.negates == dest]
        if spec.kind is bool:
            state = default if default is not None else False
            for item in self.items:
                if item.spec is not None and item.spec.dest == dest:
                    state = True
                elif item.spec is not None and item.spec.dest in negators:
                    state = False
            return state
        if not found:
            return default
        last = found[-1]
        if last.value is None:  # an optional-value flag given alone
            return "on"
        return spec.kind(last.value)

    def sequences(self) -> tuple[int, bool]:
        """(parallel sequences, whether they share one unified KV buffer), by llama-server's rules: `-np`
        left out (or negative) is auto, which means 4 sequences in one unified buffer whatever
        `--kv-unified` says; a given `-np` shares a buffer only with `--kv-unified`."""
        parallel = self.get("parallel")
        if parallel is None or parallel < 0:
            return AUTO_PARALLEL, True
        return max(parallel, 1), self.get("kv_unified")

    def switched_off(self, dest: str) -> bool:
        """Whether an on/off/auto flag is given as off (llama.cpp takes off, 0, false, disabled)."""
        return str(self.get(dest) or "").lower() in ("off", "0", "false", "disabled")

    def switched_on(self, dest: str) -> bool:
        """Whether an on/off/auto flag is given as on (llama.cpp takes on, 1, true, enabled; alone: on)."""
        return str(self.get(dest) or "").lower() in ("on", "1", "true", "enabled")

    def load_mode(self) -> str:
        """How llama.cpp reads the weights (`--load-mode`, default auto: mapped). The flags it replaced
        mean what they meant: `--no-mmap` none, `--mlock` mmap+mlock, both mlock, `--mmap` mmap."""
        if self.get("load_mode"):
            return str(self.get("load_mode"))
        no_mmap, mlock = self.get("no_mmap"), self.get("mlock")
        if no_mmap:
            return "mlock" if mlock else "none"
        if mlock:
            return "mmap+mlock"
        return "mmap" if self.get("mmap") else "auto"

    def weights_mapped(self) -> bool:
        """Whether host-resident weights stay pages of the mapped file (else they are copied into
        anonymous memory): llama-model-loader.cpp maps the file for auto, mmap and mmap+mlock."""
        return self.load_mode() in ("auto", "mmap", "mmap+mlock")

    def without(self, *dests: str) -> "LlamaServerArgs":
        """A copy without the flags of these dests (every occurrence, however spelled)."""
        return LlamaServerArgs(self.program, [replace(i) for i in self.items
                                              if i.spec is None or i.spec.dest not in dests])

    def placement_free(self) -> list[str]:
        """The argv without placement flags: what decides how much memory the server holds."""
        return self.without(*(s.dest for s in FLAGS if s.placement)).to_argv()

    def set(self, dest: str, value: Any) -> None:
        """Give a flag this value (replacing earlier occurrences), or add it at the end."""
        spec = _BY_DEST[dest]
        text = None if spec.kind is bool else str(value)
        found = self._items_for(dest)
        if found:
            found[-1].value = text
            for item in found[:-1]:
                self.items.remove(item)
        elif spec.kind is not bool or value:
            self.items.append(ArgItem(spec.names[-1], spec, text))

    def add(self, dest: str, value: str, front: bool = False) -> None:
        """Add one more occurrence of a flag, at the end or (for flags later ones depend on) in front."""
        item = ArgItem(_BY_DEST[dest].names[-1], _BY_DEST[dest], value)
        self.items.insert(0 if front else len(self.items), item)

    def unsupported_by_worker(self) -> list[str]:
        """Flags (as written) that the built-in worker does not implement."""
        return [item.spelled for item in self.items if item.spec is None or not item.spec.worker]
