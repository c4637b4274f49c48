"""The config's YAML read as llama-swap reads it (YAML 1.2 booleans, keys as written), with lines."""

from __future__ import annotations

import pytest

from berth.config import parse_config
from berth.core.errors import ConfigError

# Every word PyYAML's YAML 1.1 resolver reads as a boolean, and the one-letter words YAML 1.1 lists too
YAML11_BOOLEAN_WORDS = ["yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF",
                        "y", "Y", "n", "N"]


@pytest.mark.parametrize("word", YAML11_BOOLEAN_WORDS)
def test_a_model_named_like_a_yaml11_boolean_keeps_its_name(word):
    config = parse_config(f"models:\n  {word}:\n    cmd: llama-server --port ${{PORT}} --alias ${{MODEL_ID}}\n")
    assert list(config.models) == [word]
    spec = config.models[word]
    assert spec.id == word and spec.argv[-2:] == ("--alias", word)
    assert config.resolve(word) == word


@pytest.mark.parametrize("word", YAML11_BOOLEAN_WORDS)
def test_a_yaml11_boolean_word_where_the_schema_wants_a_string_is_that_string(word):
    config = parse_config(f"models:\n  a:\n    cmd: x --port ${{PORT}}\n    aliases: [{word}]\n"
                          f"    name: {word}\n    useModelName: {word}\n")
    spec = config.models["a"]
    assert spec.aliases == (word,) and spec.name == word and spec.use_model_name == word
    assert config.resolve(word) == "a"


@pytest.mark.parametrize(("written", "value"), [("true", True), ("false", False), ("True", True), ("FALSE", False),
                                                ("yes", True), ("off", False)])
def test_fields_the_schema_types_as_bool_still_read_booleans(written, value):
    """true/false are YAML 1.2's booleans; where the schema wants a bool, yes/no/on/off still mean one (as
    in llama-swap, whose YAML library reads them into a bool field)."""
    config = parse_config(f"sendLoadingState: {written}\nmodels:\n  a:\n    cmd: x --port ${{PORT}}\n"
                          f"    unlisted: {written}\n    warmup: {written}\n")
    spec = config.models["a"]
    assert spec.unlisted is value and spec.warmup is value and spec.send_loading_state is value


def test_untyped_values_follow_yaml12():
    """setParams and metadata hold any value: only true/false become booleans there, as in llama-swap."""
    config = parse_config("models:\n  a:\n    cmd: x --port ${PORT}\n"
                          "    filters: {setParams: {stream: on, echo: true, mode: off}}\n"
                          "    metadata: {vision: yes, tools: false}\n")
    spec = config.models["a"]
    assert dict(spec.set_params) == {"stream": "on", "echo": True, "mode": "off"}
    assert dict(spec.metadata) == {"vision": "yes", "tools": False}


@pytest.mark.parametrize("key", ["true", "False", "1.50", "010", "1:20"])
def test_keys_are_the_text_written(key):
    """A key is its text (yaml.v3 reads string keys so), not a value converted back to text."""
    config = parse_config(f"models:\n  '{key}-x':\n    cmd: x --port ${{PORT}}\n"
                          f"  {key}:\n    cmd: y --port ${{PORT}}\n")
    assert list(config.models) == [f"{key}-x", key]


def test_a_key_that_is_not_a_scalar_is_an_error_with_its_line():
    with pytest.raises(ConfigError) as caught:
        parse_config("models:\n  a:\n    cmd: x --port ${PORT}\n    metadata:\n      ~: 1\n", "k.yaml")
    assert caught.value.line == 5 and "mapping keys must be plain strings" in caught.value.message
