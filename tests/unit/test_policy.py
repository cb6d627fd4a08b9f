"""The policy model: every setting through every form (flag, TOML, JSON, kernel command line, SDK), merges."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from memvisor import cli, cmdline, policy
from memvisor.errors import ConfigError, PolicyError
from memvisor.policy import SETTINGS, Policy, ScratchMode, SwapMode

# A non-default value for every setting, as its Python value.
SAMPLE: dict[str, object] = {
    "memory_mib": 192, "memory_floor_mib": 96, "park_after_idle_s": 300,
    "cpus": 2, "timeout": 12.5, "root": True, "swap_size_mib": 1024,
    "output_limit_mib": 4, "console_log_kib": 64, "max_bad_frames": 3,
    "swap_mode": SwapMode.ENCRYPTED, "allow_weaker_swap": True, "swap_discard": True, "zram_percent": 50,
    "zram_algorithm": "zstd",
    "ksm": True, "balloon": False, "deflate_on_oom": True, "memctl": True, "templatable": True, "rootfs": "blk",
    "scratch_mib": 64, "scratch_mode": ScratchMode.PLAIN,
    "image": "tools",
}
IMPLEMENTED = list(SETTINGS)


def test_sample_covers_every_setting() -> None:
    assert set(SAMPLE) == {s.field for s in SETTINGS}
    assert {f.name for f in dataclasses.fields(Policy)} - {"sources"} == set(SAMPLE)
    for s in SETTINGS:
        assert SAMPLE[s.field] != getattr(policy.DEFAULT, s.field), s.field


def full_policy() -> Policy:
    """Every field non-default."""
    return Policy(**SAMPLE)  # type: ignore[arg-type]


def flag_words(values: dict[str, object]) -> list[str]:
    words = []
    for field, value in values.items():
        s = policy.SETTINGS_BY_FIELD[field]
        if s.kind is bool:
            words.append(s.flag if value else "--no-" + s.flag.removeprefix("--"))
        else:
            words += [s.flag, cmdline.encode_value(value)]
    return words


def test_json_round_trip_every_field() -> None:
    p = full_policy()
    doc = policy.to_json(p)
    layer = policy.layer_from_mapping(doc, "json")
    assert Policy(**layer) == p  # type: ignore[arg-type]


def test_toml_round_trip_every_field() -> None:
    p = full_policy()
    layer = policy.layer_from_mapping(tomllib.loads(policy.to_toml(p)), "toml")
    assert Policy(**layer) == p  # type: ignore[arg-type]


def test_cmdline_round_trip_guest_fields() -> None:
    p = full_policy()
    words = policy.to_cmdline(p)
    decoded = policy.parse_cmdline("console=ttyS0 quiet " + " ".join(words))
    guest_fields = {s.field for s in SETTINGS if s.cmdline}
    assert set(decoded) == guest_fields
    assert all(decoded[f] == getattr(p, f) for f in guest_fields)
    assert all(w.startswith("memvisor.") and " " not in w for w in words)


def test_cli_flags_every_field() -> None:
    args = cli.build_parser().parse_args(["run", *flag_words(SAMPLE), "--", "true"])
    layer = {s.field: policy.coerce(s, getattr(args, s.field), "flag") for s in SETTINGS}
    assert Policy(**layer) == full_policy()  # type: ignore[arg-type]


def test_cli_flags_unset_are_absent() -> None:
    args = cli.build_parser().parse_args(["run", "--", "true"])
    assert all(getattr(args, s.field) is None for s in SETTINGS)


def test_merge_keeps_every_field_file_then_flags_then_sdk() -> None:
    fields = [s.field for s in IMPLEMENTED]
    # Each layer sets a different subset; every value must survive unless a later layer overrides it.
    file_layer = {"memory_mib": 160, "cpus": 2, "timeout": 30.0}
    flag_layer = {"cpus": 1, "root": True}
    sdk_layer = {"timeout": 5.0}
    p = policy.merge(("file", file_layer), ("flags", flag_layer), ("sdk", sdk_layer))
    assert (p.memory_mib, p.cpus, p.timeout, p.root) == (160, 1, 5.0, True)
    assert dict(p.sources) == {"memory_mib": "file", "cpus": "flags", "timeout": "sdk", "root": "flags"}
    assert set(fields) <= {f.name for f in dataclasses.fields(p)}


@pytest.mark.parametrize("setting", IMPLEMENTED, ids=lambda s: s.field)
def test_each_implemented_field_survives_every_layer_order(setting: policy.Setting) -> None:
    value = SAMPLE[setting.field]
    for position in range(3):
        layers: list[tuple[str, dict[str, object]]] = [("file", {}), ("flags", {}), ("sdk", {})]
        layer: dict[str, object] = {setting.field: value}
        if setting.field == "swap_mode":
            layer["swap_size_mib"] = 64  # a mode needs a size
        if setting.field == "swap_discard":
            layer.update(swap_size_mib=64, swap_mode=SwapMode.ENCRYPTED)  # discard needs a mode that passes it
        layers[position] = (layers[position][0], layer)
        p = policy.merge(*layers)
        assert getattr(p, setting.field) == value
        assert dict(p.sources)[setting.field] == layers[position][0]


def test_toml_file_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "memvisor.toml"
    conf.write_text("[vm]\nmemory_mib = 160\ncpus = 2\n[run]\nroot = true\n")
    args = cli.build_parser().parse_args(["--config", str(conf), "run", "--cpus", "1", "--", "true"])
    p = cli.policy_from_args(args)
    assert (p.memory_mib, p.cpus, p.root) == (160, 1, True)


def test_settings_that_conflict() -> None:
    with pytest.raises(PolicyError, match="--deflate-on-oom needs the balloon"):
        policy.merge(("flags", {"balloon": False, "deflate_on_oom": True}))
    with pytest.raises(PolicyError, match="needs a swap size"):
        policy.merge(("flags", {"swap_mode": SwapMode.PLAIN}))


@pytest.mark.parametrize(("field", "raw", "match"), [
    ("memory_mib", "lots", "invalid value 'lots'"),
    ("memory_mib", "16", "below the minimum 64"),
    ("cpus", "0", "below the minimum 1"),
    ("cpus", "1.5", "invalid value"),
    ("timeout", "-1", "below the minimum"),
    ("root", "maybe", "invalid value 'maybe'"),
    ("swap_mode", "fancy", "choose one of off, plain, encrypted, authenticated, confidential"),
    ("zram_algorithm", "gzip", "choose one of"),
])
def test_bad_values_name_the_flag_and_value(field: str, raw: str, match: str) -> None:
    with pytest.raises(PolicyError, match=match) as info:
        policy.coerce(policy.SETTINGS_BY_FIELD[field], raw, "flag")
    assert policy.SETTINGS_BY_FIELD[field].flag in info.value.message


def test_toml_types_are_checked() -> None:
    with pytest.raises(PolicyError, match="vm.memory_mib has invalid value '256'"):
        policy.layer_from_mapping({"vm": {"memory_mib": "256"}}, "f.toml")
    with pytest.raises(PolicyError, match="invalid value True"):
        policy.layer_from_mapping({"vm": {"cpus": True}}, "f.toml")


def test_unknown_toml_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown key vm.memory .*keys in \[vm\]: cpus, floor_mib, memory_mib"):
        policy.layer_from_mapping({"vm": {"memory": 1}}, "f.toml")
    with pytest.raises(ConfigError, match="unknown section"):
        policy.layer_from_mapping({"vmm": {}}, "f.toml")


def test_effective_swap_mode_defaults() -> None:
    assert policy.DEFAULT.effective_swap_mode is SwapMode.OFF
    assert Policy(swap_size_mib=64).effective_swap_mode is SwapMode.CONFIDENTIAL
    assert Policy(swap_size_mib=64, swap_mode=SwapMode.PLAIN).effective_swap_mode is SwapMode.PLAIN


def test_cmdline_values_cannot_inject_words() -> None:
    with pytest.raises(ValueError):
        cmdline.encode_value("a b")
    assert cmdline.parse("x memvisor.a=1 memvisor.a=2 memvisor.b") == {"a": "2"}


def test_swap_discard_is_refused_with_authenticated_swap_or_without_swap() -> None:
    with pytest.raises(PolicyError, match="authenticated") as info:
        policy.merge(("test", {"swap_size_mib": 64, "swap_mode": "authenticated", "swap_discard": True}))
    assert "confidential" in (info.value.hint or "")
    with pytest.raises(PolicyError, match="needs disk swap"):
        policy.merge(("test", {"swap_discard": True}))
    for mode in ("plain", "encrypted", "confidential"):  # confidential's tags are in guest RAM: no forged marker
        assert policy.merge(("test", {"swap_size_mib": 64, "swap_mode": mode, "swap_discard": True})).swap_discard
    assert policy.merge(("test", {"swap_size_mib": 64, "swap_discard": True})).swap_discard  # the default mode


def test_scratch_mode_defaults_to_confidential_and_travels_to_the_guest() -> None:
    assert policy.DEFAULT.scratch_mode is ScratchMode.CONFIDENTIAL
    words = policy.to_cmdline(policy.merge(("t", {"scratch_mib": 64, "rootfs": "blk"})))
    assert "memvisor.scratch_mode=confidential" in words and "memvisor.scratch_mib=64" in words
    plain = policy.layer_from_mapping({"image": {"scratch_mode": "plain"}}, "f.toml")
    assert plain == {"scratch_mode": ScratchMode.PLAIN}
    with pytest.raises(PolicyError, match="choose one of confidential, plain"):
        policy.coerce(policy.SETTINGS_BY_FIELD["scratch_mode"], "encrypted", "flag")


def test_swap_modes_are_ordered_weakest_first() -> None:
    # host/sandbox.py refuses an effective mode weaker than the one asked for by this order
    assert list(SwapMode) == [SwapMode.OFF, SwapMode.PLAIN, SwapMode.ENCRYPTED, SwapMode.AUTHENTICATED,
                              SwapMode.CONFIDENTIAL]
    assert policy.to_cmdline(policy.merge(("t", {"swap_size_mib": 64, "swap_mode": "confidential"}))).count(
        "memvisor.swap_mode=confidential") == 1


def test_memory_floor_default_and_bounds() -> None:
    # No floor of its own by default: the supervisor's floor is then what the guest needs (service/need.py).
    assert policy.merge(("t", {"memory_mib": 1024})).memory_floor_mib is None
    assert policy.merge(("t", {"memory_mib": 256, "memory_floor_mib": 200})).memory_floor_mib == 200
    with pytest.raises(PolicyError, match="above --memory"):
        policy.merge(("t", {"memory_mib": 128, "memory_floor_mib": 200}))


def test_deflate_on_oom_is_on_with_the_balloon_unless_turned_off() -> None:
    assert policy.merge(("t", {})).balloon_deflates_on_oom
    assert not policy.merge(("t", {"deflate_on_oom": False})).balloon_deflates_on_oom
    assert not policy.merge(("t", {"balloon": False})).balloon_deflates_on_oom


def test_memctl_and_ksm_are_refused_together() -> None:
    with pytest.raises(PolicyError, match="--memctl and --ksm cannot be used together"):
        policy.merge(("flags", {"ksm": True, "memctl": True}))
