"""The config file and the SDK layer on top of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvisor import config
from memvisor.errors import ConfigError, PolicyError
from memvisor.sdk import Sandbox


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", explicit=True)


def test_missing_default_config_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_CONFIG", str(tmp_path / "none.toml"))
    assert config.load(None, explicit=False)[1] == {}


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm\nmemory_mib = 1\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        config.load(bad, explicit=True)


def test_sdk_overrides_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[vm]\nmemory_mib = 160\ncpus = 2\n")
    sb = Sandbox(memory_mib=128, config_file=conf)
    assert (sb.policy.memory_mib, sb.policy.cpus) == (128, 2)
    assert sb.with_policy(cpus=1).policy.cpus == 1
    assert sb.policy.cpus == 2  # immutable


def test_sdk_rejects_unknown_and_unimplemented() -> None:
    with pytest.raises(TypeError, match="memroy"):
        Sandbox(memroy=1, config_file=False)
    with pytest.raises(PolicyError, match="needs the balloon"):
        Sandbox(balloon=False, deflate_on_oom=True, config_file=False)
    with pytest.raises(PolicyError, match="too small"):
        Sandbox(config_file=False).with_swap(8)


def test_sdk_with_swap_and_zram() -> None:
    sb = Sandbox(memory_mib=192, config_file=False).with_swap(1024, mode="encrypted").with_zram(50, "zstd")
    p = sb.policy
    assert (p.swap_size_mib, p.swap_mode, p.zram_percent, p.zram_algorithm) == (1024, "encrypted", 50, "zstd")
    assert Sandbox(config_file=False).with_swap(64).policy.effective_swap_mode == "confidential"
