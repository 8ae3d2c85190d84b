"""Fixup profiles in the configuration: built-ins, [profiles.<name>] tables, a model's profile name."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sparkd.config import ConfigError, load_config
from sparkd.fixups import BUILTIN_PROFILES

MODEL = """
[models.alpha]
image = "localhost/sparkd-test-engine:latest"
{extra}
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return [str(p) for p in caught.value.problems]


def test_builtin_profiles_are_there_without_tables(tmp_path):
    config = load(tmp_path, MODEL.format(extra='profile = "gemma"'))
    assert set(BUILTIN_PROFILES) <= set(config.profiles)
    assert config.profiles["gemma"].merge_system


def test_profile_tables_add_and_replace(tmp_path):
    config = load(
        tmp_path,
        MODEL.format(extra='profile = "mine"')
        + """
[profiles.mine]
extends = "gemma"
thinking_flag = "enable_thinking"
thinking_default = false

[profiles.default]
default_max_tokens = 512
""",
    )
    mine = config.profiles["mine"]
    assert mine.merge_system and mine.thinking_default is False
    assert config.profiles["default"].default_max_tokens == 512 and config.profiles["default"].cap_max_tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MODEL.format(extra='profile = "nope"'), "models.alpha.profile: expected one of the profiles coder-force-tools, default,"),
        ("[profiles.x]\nmerge_sytem = true\n", "profiles.x.merge_sytem: expected one of the known keys"),
        ("[profiles.x]\ntools = \"some\"\n", "profiles.x.tools: expected one of 'full', 'none', 'force-required'"),
        ("[profiles.x]\nextends = \"nope\"\n", "profiles.x.extends: expected a known profile, without cycles, found unknown profile 'nope'"),
        ("[profiles.x]\nextends = \"y\"\n[profiles.y]\nextends = \"x\"\n", "a cycle of extends"),
        ("[profiles.x]\nthinking_default = false\n", "profiles.x.thinking_default: expected thinking_flag set too"),
        ("[profiles.x]\ncontext_margin = -1\n", "profiles.x.context_margin: expected zero or a positive number"),
        ("[profiles.x]\ndefault_max_tokens = 0\n", "profiles.x.default_max_tokens: expected a positive number"),
        ("profiles = 3\n", "profiles: expected tables [profiles.<name>]"),
        ("[server]\ncors_origins = [\"localhost\"]\n", "server.cors_origins[0]: expected an origin pattern"),
        ("[server]\nbody_timeout_s = 0\n", "server.body_timeout_s: expected a positive number"),
    ],
)
def test_profile_mistakes_are_reported(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_the_shipped_catalog_names_only_known_profiles():
    config = load_config(Path(__file__).resolve().parents[2] / "etc" / "sparkd.toml")
    assert {m.profile for m in config.models.values()} <= set(config.profiles)
