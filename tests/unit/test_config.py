"""storyline.toml: defaults, argv commands, and errors that name the key."""

from __future__ import annotations

import pytest

from service.config_file import DEFAULT_CONFIG, ConfigError, parse_config


def test_default_config_parses_to_the_spec_defaults() -> None:
    config = parse_config(DEFAULT_CONFIG)
    assert (config.max_retries, config.max_mergemasters) == (3, 1)
    assert (config.abort_respawn_cap, config.mergemaster_respawn_cap) == (5, 3)
    assert (config.fixup.max_turns, config.fixup.max_budget_usd) == (20, 1.0)
    assert config.agent_for("coder") is not None
    assert config.agent_for("mergemaster") is not None
    assert parse_config("").agent == []


def test_string_commands_are_split_never_shelled() -> None:
    config = parse_config('[gates]\ncommands = ["pytest -q \'tests/a b.py\'", ["ruff", "check"]]')
    assert config.gates.commands == [["pytest", "-q", "tests/a b.py"], ["ruff", "check"]]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("max_coderz = 2", "unknown key 'max_coderz'"),
        ("max_retries = -1", "key 'max_retries'"),
        ("max_coders = 'two'", "key 'max_coders'"),
        ('base_branch = "-rf"', "key 'base_branch'"),
        ('[merge_gates]\nfixup_patterns = ["(unclosed"]', "key 'merge_gates.fixup_patterns'"),
        ('[gates]\ncommands = [""]', "key 'gates.commands'"),
        ('[[agent]]\nname = "a"\nruntime = "openai"', "base_url is required"),
        ('[[agent]]\nname = "a"\n[[agent]]\nname = "a"', "duplicate agent names: a"),
        ('[[agent]]\nname = "../x"', "key 'agent.0.name'"),
        ('[[agent]]\nname = "a"\nstage = "boss"', "key 'agent.0.stage'"),
        ('[[server.tokens]]\nactor = "user:a"', "exactly one of token or token_env"),
        ('[[server.tokens]]\nactor = "user:a"\ntoken = "short"', "key 'server.tokens.0.token'"),
        ("inactivity_timeout_secs = 0", "key 'inactivity_timeout_secs'"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert names in str(info.value)
    assert str(info.value).startswith("storyline.toml")
