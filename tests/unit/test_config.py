"""Config parsing on llama-swap files written the way people write them."""

from __future__ import annotations

import textwrap

import pytest

from berth.config import parse_config
from berth.config.cmdline import split_command
from berth.core.errors import ConfigError

# The shape of seed 000 (a Kubernetes ConfigMap for llama-swap), macros restored.
SEED_000 = """\
---
# Single GPU: only one model runs at a time.
healthCheckTimeout: 900

macros:
  # Shared flags
  common: >
    --host 127.0.0.1 --port ${PORT}
    --jinja
    --cache-type-k q8_0 --cache-type-v q8_0
    --temp 0.6 --top-k 20
    --metrics

models:
  gemma-4:
    ttl: 900
    aliases:
      - self-hosted
    cmd: >
      /app/llama-server
      ${common}
      -hf unsloth/gemma-4-26B-A4B-it-GGUF:UD-Q3_K_XL
      --fit-ctx 100000
      --fit-target 512
      --parallel 2
      --no-mmap
      --swa-full
      --slot-save-path /cache/slots
      --min-p 0.0

  qwen-3.5:
    ttl: 900
    cmd: >
      /app/llama-server
      ${common}
      -hf unsloth/Qwen3.5-9B-GGUF:UD-Q5_K_XL
      --ctx-size 160000
      --override-tensor token_embd\\.weight=CUDA0
      --no-context-shift
"""

# The shape of seed 001: vision models with mmproj, stable symlinked paths, checkEndpoint.
SEED_001 = """\
healthCheckTimeout: 300
logLevel: info
startPort: 10001
macros:
  server: /app/llama-server --host 127.0.0.1 --port ${PORT} -ngl 99 -c 3072
models:
  qwen3vl-8b:
    cmd: |
      ${server}
      -m /models/qwen3vl-8b/model.gguf
      --mmproj /models/qwen3vl-8b/mmproj.gguf
    checkEndpoint: /health
    ttl: 600
  minicpm-v-4-5:
    cmd: |
      ${server}
      # the projector must match the model
      -m /models/minicpm-v-4-5/model.gguf \\
      --mmproj /models/minicpm-v-4-5/mmproj.gguf
    ttl: 600
  qwen3vl-4b:
    cmd: ${server} -m /models/qwen3vl-4b/model.gguf --mmproj /models/qwen3vl-4b/mmproj.gguf
    ttl: 600
"""


def test_seed_000_resolves_macros_ports_and_aliases():
    config = parse_config(SEED_000, "seed000.yaml")
    gemma = config.models["gemma-4"]
    assert gemma.argv[:4] == ("/app/llama-server", "--host", "127.0.0.1", "--port")
    # ${PORT} is bound when a start picks a free port, not by the model's place in the file
    assert gemma.uses_port and gemma.argv[4] == "${PORT}" and gemma.proxy == "http://127.0.0.1:${PORT}"
    bound = gemma.with_port(5807)
    assert bound.port == 5807 and bound.argv[4] == "5807" and bound.proxy == "http://127.0.0.1:5807"
    assert config.start_port == 5800
    assert "token_embd\\.weight=CUDA0" in config.models["qwen-3.5"].argv
    assert config.resolve("self-hosted") == "gemma-4"
    assert gemma.ttl == 900 and gemma.health_check_timeout == 900
    assert config.groups["(default)"].members == ("gemma-4", "qwen-3.5")
    assert config.warnings == []


def test_seed_001_comments_continuations_and_start_port():
    config = parse_config(SEED_001, "seed001.yaml")
    mini = config.models["minicpm-v-4-5"]
    assert mini.argv[-4:] == ("-m", "/models/minicpm-v-4-5/model.gguf", "--mmproj", "/models/minicpm-v-4-5/mmproj.gguf")
    assert "#" not in " ".join(mini.argv)
    assert config.start_port == 10001 and all(m.uses_port for m in config.models.values())
    assert config.models["qwen3vl-8b"].check_endpoint == "/health"


def test_nested_macros_env_model_id_and_model_level_macros():
    config = parse_config(textwrap.dedent("""\
        macros:
          base: "--port ${PORT}"
          full: "${base} --alias ${MODEL_ID} --tag ${tag}"
          tag: global
        models:
          m1:
            macros:
              tag: local
            cmd: srv ${full} --key ${env.MY_KEY}
            env: ["A=${MODEL_ID}", "B=x=y", "P=${PORT}"]
            cmdStop: kill -TERM ${PID} ${PORT}
        """), "c.yaml", environ={"MY_KEY": "s3"})
    m = config.models["m1"].with_port(5800)
    assert m.argv == ("srv", "--port", "5800", "--alias", "m1", "--tag", "local", "--key", "s3")
    assert m.env == (("A", "m1"), ("B", "x=y"), ("P", "5800"))
    assert m.stop_argv == ("kill", "-TERM", "${PID}", "5800")


def test_windows_paths_and_quotes_survive():
    argv = split_command('C:\\llama\\llama-server.exe -m "C:\\My Models\\q.gguf" --chat-template \'{{ x }}\'')
    assert argv == ["C:\\llama\\llama-server.exe", "-m", "C:\\My Models\\q.gguf", "--chat-template", "{{ x }}"]


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    ("models:\n  a:\n    cmd: x --port ${PORT}\n    ttl: soon\n", 4, "models.a.ttl", "integer"),
    ("models:\n  a:\n    cmd: x ${nope} --port ${PORT}\n", 3, "models.a.cmd", "unknown macro ${nope}"),
    ("models:\n  a:\n    cmd: x --port ${PORT} --k ${env.BERTH_TEST_UNSET}\n", 3, "models.a.cmd", "BERTH_TEST_UNSET"),
    ("models:\n  a:\n    cmd: x\n", 3, "models.a.cmd", "proxy uses ${PORT} but cmd does not"),
    ("models:\n  a:\n    cmd: 'x \"unclosed --port ${PORT}'\n", 3, "models.a.cmd", "quotes"),
    ("models:\n  a:\n    cmd: x --port ${PORT}\n    env: [NOEQUALS]\n", 4, "models.a.env", "NAME=value"),
    ("models:\n  a:\n    cmd: x --port ${PORT}\n  a:\n    cmd: y\n", 4, "a", "duplicate key"),
    ("models:\n  a:\n    cmd: x --port ${PORT}\n    aliases: [a]\n", 4, "models.a.aliases.0", "also a model id"),
    ("macros:\n  PORT: 1\nmodels: {}\n", 2, "macros.PORT", "reserved"),
    ("macros:\n  a: ${b}\n  b: ${a}\nmodels:\n  m:\n    cmd: x ${a} --port ${PORT}\n", 6, "models.m.cmd", "cycle"),
    ("models:\n  a:\n    cmd: [unclosed\n", 4, "", "YAML syntax"),
    ("returnTo: nope\nmodels:\n  a:\n    cmd: x --port ${PORT}\n", 1, "returnTo", "'nope', which is not a model"),
    ("models:\n  a:\n    cmd: x --port ${PORT}\n    returnTo: a\n", 4, "models.a.returnTo", "cannot return to itself"),
    ("maxWait: -1\nmodels: {}\n", 1, "maxWait", "greater than or equal to 0"),
    ("models:\n  a:\n    cmd: x --port ${PORT}\n    sleepAfter: -5\n", 4, "models.a.sleepAfter", "greater than"),
])
def test_bad_configs_name_file_line_and_key(text, line, key, words):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.yaml", environ={})
    err = info.value
    assert (err.path, err.line, err.key) == ("bad.yaml", line, key), err.message
    assert words in err.message


def test_unimplemented_keys_warn_with_their_line():
    config = parse_config(textwrap.dedent("""\
        models:
          a:
            cmd: x --port ${PORT}
            sendLoadingState: true
            timeouts: {tlsHandshake: 10, dnsLookup: 3}
        hookz: {}
        """), "w.yaml")
    assert config.warnings == [
        "w.yaml:5: models.a.timeouts.dnsLookup: not supported by berth; ignored",
        "w.yaml:6: hookz: not supported by berth; ignored",
    ]


def test_groups_defaults_and_ungrouped_models():
    config = parse_config(textwrap.dedent("""\
        models:
          a: {cmd: "x --port ${PORT}"}
          b: {cmd: "x --port ${PORT}"}
          c: {cmd: "x --port ${PORT}"}
        groups:
          pinned:
            persistent: true
            swap: false
            exclusive: false
            members: [a, b]
        """), "g.yaml")
    assert config.models["a"].group == "pinned"
    assert config.models["c"].group == "(default)"
    pinned = config.groups["pinned"]
    assert (pinned.swap, pinned.exclusive, pinned.persistent) == (False, False, True)


def test_filters_check_endpoint_none_and_global_ttl():
    config = parse_config(textwrap.dedent("""\
        globalTTL: 300
        models:
          a:
            cmd: x --port ${PORT}
            checkEndpoint: none
            useModelName: real/name
            filters:
              stripParams: "temperature, top_p, model"
              setParams: {top_k: 5}
          b:
            cmd: x --port ${PORT}
            ttl: 0
        """), "f.yaml")
    a = config.models["a"]
    assert a.check_endpoint is None and a.ttl == 300
    assert a.strip_params == ("temperature", "top_p")  # model is never stripped
    assert a.set_params == (("top_k", 5),)
    assert config.models["b"].ttl == 0


def test_default_model_is_alias_default_or_the_only_model():
    one = parse_config("models:\n  solo: {cmd: 'x --port ${PORT}'}\n")
    assert one.default_model() == "solo"
    two = parse_config("models:\n  a: {cmd: 'x --port ${PORT}', aliases: [default]}\n  b: {cmd: 'y --port ${PORT}'}\n")
    assert two.default_model() == "a"
    none = parse_config("models:\n  a: {cmd: 'x --port ${PORT}'}\n  b: {cmd: 'y --port ${PORT}'}\n")
    assert none.default_model() is None


def test_llama_swaps_remaining_keys_and_their_defaults():
    config = parse_config(textwrap.dedent("""\
        unloadTimeout: 7
        logToStdout: both
        logTimeFormat: rfc3339
        metricsMaxInMemory: 50
        captureBuffer: 15
        ui: {activity: {session_id: [X-Session-ID]}}
        performance: {every: 15s}
        upstream: {ignorePaths: ['^/ws$']}
        models:
          a:
            cmd: x --port ${PORT}
            unloadTimeout: 0
            healthCheckTimeout: 900
            capabilities: {in: [text, image], out: [text], tools: true, context: 32000}
            compat: {ignoreWebsockets: true}
            filters: {strip_params: "temperature, top_p"}
          b:
            cmd: x --port ${PORT}
            unloadTimeout: 3
        """), "k.yaml")
    assert config.warnings == []
    assert len(config.notes) == 1 and config.notes[0].startswith("k.yaml:5: captureBuffer, ui, performance: "
                                                                 "settings of llama-swap's web UI")
    a, b = config.models["a"], config.models["b"]
    assert (a.unload_timeout, b.unload_timeout) == (7, 3)  # 0 takes the top-level value
    assert (a.health_check_timeout, b.health_check_timeout) == (900, 120)
    assert a.capabilities.inputs == ("text", "image") and a.capabilities.tools and a.capabilities.context == 32000
    assert a.strip_params == ("temperature", "top_p")  # the legacy spelling
    assert (config.log_to_stdout, config.log_time_format, config.metrics_max_in_memory) == ("both", "rfc3339", 50)
    assert [p.pattern for p in config.upstream_ignore_paths] == ["^/ws$"]
    defaults = parse_config("models:\n  a: {cmd: 'x --port ${PORT}'}\n")
    assert defaults.notes == [] and defaults.log_to_stdout == "proxy" and defaults.metrics_max_in_memory == 1000
    assert defaults.upstream_ignore_paths[0].search("/static/app.js")  # llama-swap's default pattern


@pytest.mark.parametrize(("text", "where", "message"), [
    ("logTimeFormat: iso\n", "logTimeFormat", "ansic"),
    ("logToStdout: everything\n", "logToStdout", "proxy"),
    ("upstream: {ignorePaths: ['(']}\n", "upstream.ignorePaths.0", "not a regular expression"),
    ("metricsMaxInMemory: 0\n", "metricsMaxInMemory", "greater than or equal to 1"),
])
def test_bad_values_of_those_keys_name_key_and_fix(text, where, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(text + "models:\n  a: {cmd: 'x --port ${PORT}'}\n", "v.yaml")
    assert where in str(caught.value) and message in str(caught.value)


def test_references_to_undefined_models_are_reported_and_left_out():
    """llama-swap's reference config names models it does not define; berth loads it and says so."""
    config = parse_config(textwrap.dedent("""\
        models:
          a: {cmd: "x --port ${PORT}"}
        groups:
          g: {members: [a, zz]}
        hooks:
          on_startup:
            preload: [ghost, a]
        selectors:
          s: {strategy: warm, targets: [nope, a]}
        profiles:
          p: {pins: {x: a, y: missing}}
        """), "d.yaml")
    assert config.warnings == [
        "d.yaml:4: groups.g.members.1: no model 'zz' is defined under models:; this member is left out",
        "d.yaml:7: hooks.on_startup.preload.0: no model 'ghost' is defined under models:; this preload is left out",
        "d.yaml:9: selectors.s.targets.0: no model 'nope' is defined under models:; this target is left out",
        "d.yaml:11: profiles.p.pins.y: no model 'missing' is defined under models:; this pin is left out",
    ]
    assert config.groups["g"].members == ("a",) and config.preload == ["a"]
    assert config.selectors["s"].targets == ("a",) and dict(config.profiles["p"].pins) == {"x": "a"}


def test_a_record_field_named_as_in_the_schema_is_carried_over_as_written():
    """A plain new key is a schema field and a record field of the same name; nothing else to write."""
    from dataclasses import dataclass

    from pydantic import BaseModel

    from berth.config.reading import carried

    class Top(BaseModel):
        limit: int = 7

    class Section(BaseModel):
        flag: bool = False
        limit: int | None = None
        names: list[str] = []

    @dataclass
    class Record:
        flag: bool
        limit: int
        names: tuple[str, ...] = ()
        resolved: str = ""

    assert carried(Section(flag=True), Record, {"names": ("a",)}, defaults=Top()) == {
        "flag": True, "limit": 7, "names": ("a",)}  # an unset model key takes the top level's
    assert carried(Section(limit=3), Record, {"names": ()}, defaults=Top())["limit"] == 3
    with pytest.raises(TypeError, match="Record.names: the schema holds a list; resolve it explicitly"):
        carried(Section(), Record, {})


def test_model_keys_without_a_value_take_the_top_level_ones_of_the_same_name():
    config = parse_config("healthCheckTimeout: 77\nsendLoadingState: true\nhealthCheckInterval: 3\nmodels:\n"
                          "  a: {cmd: 'x --port ${PORT}'}\n"
                          "  b: {cmd: 'x --port ${PORT}', healthCheckTimeout: 5, sendLoadingState: false,"
                          " healthCheckInterval: 0}\n")
    a, b = config.models["a"], config.models["b"]
    assert (a.health_check_timeout, a.send_loading_state, a.health_check_interval) == (77, True, 3)
    assert (b.health_check_timeout, b.send_loading_state, b.health_check_interval) == (5, False, 0)


def test_batching_sleep_and_return_to_keys():
    config = parse_config(textwrap.dedent("""\
        maxWait: 12
        minResidency: 4
        returnTo: everyday
        models:
          everyday:
            cmd: x --port ${PORT}
            aliases: [daily]
          big:
            cmd: x --port ${PORT}
            sleepAfter: 120
          special:
            cmd: x --port ${PORT}
            returnTo: daily
        """), "c.yaml", environ={})
    assert (config.max_wait, config.min_residency) == (12, 4)
    assert config.models["big"].sleep_after == 120 and config.models["everyday"].sleep_after == 0
    assert config.models["big"].return_to == "everyday"  # the top level's
    assert config.models["special"].return_to == "everyday"  # its own, by alias
    assert config.models["everyday"].return_to is None  # the baseline has nothing to return to
    defaults = parse_config("models:\n  a:\n    cmd: x --port ${PORT}\n", "d.yaml", environ={})
    assert (defaults.max_wait, defaults.min_residency, defaults.models["a"].return_to) == (30, 10, None)


def test_a_peer_key_sent_over_plain_http_to_another_machine_is_warned_about():
    config = parse_config(textwrap.dedent("""\
        models: {}
        peers:
          lan: {proxy: "http://10.0.0.9:8080", apiKey: k, models: [m]}
          tls: {proxy: "https://api.example", apiKey: k, models: [m]}
          here: {proxy: "http://127.0.0.1:9000", apiKey: k, models: [m]}
          open: {proxy: "http://10.0.0.10:8080", models: [m]}
        """), "p.yaml")
    assert config.warnings == [
        "p.yaml:3: peers.lan.apiKey: sent over plain http to 10.0.0.9, where anyone on the network path can read "
        "it; use an https:// proxy URL (or a VPN such as WireGuard between the machines)"]


def test_allowed_origins_are_origins():
    config = parse_config('allowedOrigins: ["https://Chat.example", "http://127.0.0.1:3000/", "*"]\nmodels: {}\n')
    assert config.allowed_origins == ["https://chat.example", "http://127.0.0.1:3000", "*"]
    with pytest.raises(ConfigError) as info:
        parse_config('allowedOrigins: ["chat.example"]\nmodels: {}\n', "o.yaml")
    assert (info.value.line, info.value.key) == (1, "allowedOrigins.0")
    assert "scheme://host[:port]" in info.value.message


# -- apiKeys ------------------------------------------------------------------------------------------

KEYS_MODELS = """
models:
  qwen3-8b: {cmd: "server -m a.gguf --port ${PORT}"}
"""


def sha256_hex(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_a_plain_list_of_keys_gives_each_full_access_under_its_place_in_the_list():
    config = parse_config("apiKeys: [first-secret, '${env.SECOND}']\n" + KEYS_MODELS, environ={"SECOND": "two"})
    first, second = config.api_keys
    assert (first.name, second.name) == ("key-1", "key-2")
    assert first.digest.hex() == sha256_hex("first-secret") and second.digest.hex() == sha256_hex("two")
    assert first.models == ("*",) and first.scopes == {"inference", "admin", "logs", "metrics"}
    assert first.limits.requests_per_minute == first.limits.tokens_per_day == first.limits.concurrency == 0
    assert "first-secret" not in repr(config) and "two" not in repr(config.api_keys)


def test_named_keys_with_a_hash_or_a_key_their_models_scopes_limits_and_weight():
    text = f"""
apiKeys:
  - ${{env.ADMIN_KEY}}
  - name: alice
    keyHash: sha256:{sha256_hex("test")}
    models: ["qwen*", embed]
    scopes: [inference, logs]
    limits: {{requestsPerMinute: 60, tokensPerDay: 200000, concurrency: 4}}
    weight: 2
  - name: cron
    key: ${{env.CRON_KEY}}
""" + KEYS_MODELS
    admin, alice, cron = parse_config(text, environ={"ADMIN_KEY": "root", "CRON_KEY": "c"}).api_keys
    assert admin.name == "key-1" and admin.scopes == {"inference", "admin", "logs", "metrics"}
    assert alice.digest.hex() == sha256_hex("test") and alice.models == ("qwen*", "embed")
    assert alice.scopes == {"inference", "logs"} and alice.weight == 2
    assert (alice.limits.requests_per_minute, alice.limits.tokens_per_day, alice.limits.concurrency) == (60, 200000, 4)
    assert cron.digest.hex() == sha256_hex("c") and cron.scopes == {"inference"} and cron.models == ("*",)


@pytest.mark.parametrize(("entries", "line", "message"), [
    ("  - {key: x}\n", 3, "needs a `name`"),
    ("  - {name: a}\n", 3, "needs `key:`"),
    ("  - {name: a, key: x, keyHash: 'sha256:00'}\n", 3, "either key or keyHash, not both"),
    ("  - name: a\n    keyHash: 9f86d08\n", 4, "sha256: and 64 lower-case hex digits"),
    ("  - {name: 'a b', key: x}\n", 3, "must be 1-64 letters"),
    ("  - {name: a, key: x}\n  - {name: a, key: y}\n", 4, "is taken by apiKeys entry 0"),
    ("  - same\n  - {name: b, key: same}\n", 4, "the same as 'key-1'"),
    ("  - {name: a, key: x, scopes: [root]}\n", 3, "inference"),
    ("  - {name: a, key: x, models: []}\n", 3, "at least 1"),
    ("  - {name: a, key: x, limits: {concurrency: -1}}\n", 3, "greater than or equal to 0"),
    ("  - '${env.EMPTY}'\n", 2, "API key is empty"),  # a plain item has no line of its own: apiKeys'
])
def test_a_key_entry_a_user_got_wrong_is_refused_with_its_line(entries, line, message):
    with pytest.raises(ConfigError) as caught:
        parse_config("models: {}\napiKeys:\n" + entries, environ={"EMPTY": ""})
    assert caught.value.line == line and message in caught.value.message


def test_an_unknown_key_inside_a_key_entry_is_warned_about_with_its_line():
    config = parse_config("models: {}\napiKeys:\n  - name: a\n    key: x\n    scope: [admin]\n")
    assert any(":5: apiKeys.0.scope: not supported" in warning for warning in config.warnings)


def test_an_rpc_agents_key_that_is_also_a_named_clients_key_is_warned_about():
    model = "  m:\n    cmd: llama-server -m /m.gguf --port ${PORT}\n    rpc: {agents: ['10.0.0.2:7070'], apiKey: k}\n"
    shared = parse_config(f"apiKeys:\n  - {{name: a, keyHash: 'sha256:{sha256_hex('k')}'}}\nmodels:\n" + model)
    assert any("models.m.rpc.apiKey: also one of apiKeys" in w for w in shared.warnings), shared.warnings
    own = parse_config("apiKeys:\n  - {name: a, key: other}\nmodels:\n" + model)
    assert not any("rpc.apiKey" in w for w in own.warnings)


def test_capture_bodies_is_off_unless_asked_and_a_wrong_value_names_the_key():
    model = "models:\n  m: {cmd: 'x --port ${PORT}'}\n"
    assert parse_config(model).capture_bodies is False
    assert parse_config("captureBodies: true\n" + model).capture_bodies is True
    with pytest.raises(ConfigError, match="captureBodies"):
        parse_config("captureBodies: maybe\n" + model)


def test_each_model_with_port_gets_llama_swaps_stable_port_in_the_order_of_its_id():
    """llama-swap numbers ${PORT} from startPort over the model ids sorted, skipping models without it."""
    config = parse_config(textwrap.dedent("""\
        startPort: 7000
        models:
          zeta: {cmd: "x --port ${PORT}"}
          alpha: {cmd: "x --port ${PORT}"}
          fixed: {cmd: "x --port 9000", proxy: "http://127.0.0.1:9000"}
          beta: {cmd: "x --port ${PORT}"}
        """))
    ports = {model_id: spec.preferred_port for model_id, spec in config.models.items()}
    assert ports == {"zeta": 7002, "alpha": 7000, "fixed": None, "beta": 7001}
    # the macro stays in the spec until a start binds the port it really gets
    assert config.models["alpha"].argv[-1] == "${PORT}"
    assert parse_config('models:\n  a: {cmd: "x --port ${PORT}"}\n').models["a"].preferred_port == 5800


def test_fallback_model_takes_requests_for_unknown_names_and_is_off_by_default():
    two = 'models:\n  a: {cmd: "x --port ${PORT}", aliases: [chat]}\n  b: {cmd: "x --port ${PORT}"}\n'
    config = parse_config(two)
    assert config.fallback_model == "" and config.default_model() is None
    config = parse_config("fallbackModel: chat\n" + two)  # an alias names its model
    assert config.fallback_model == "a" and config.default_model() == "a" and config.warnings == []
    with pytest.raises(ConfigError) as raised:
        parse_config("fallbackModel: ghost\n" + two, "f.yaml")
    assert str(raised.value) == ("f.yaml:1: fallbackModel: fallbackModel names 'ghost', which is not a model id "
                                 "or alias here; use one of: a, b")
