"""Device profiles: the shipped ones load, bad input is named precisely, budgets combine as documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedbe import device_profile
from fedbe.device_profile import (
    DeviceProfile,
    EmulationSettings,
    combine_budget,
    load_profile,
    parse_size,
    resolve_profile,
    shipped_profile_folder,
    shipped_profile_names,
)
from fedbe.errors import ConfigError
from fedbe.quantization import Precision

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "profiles").glob("*.yaml"))
GiB = 2**30


def test_the_expected_profiles_ship() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "jetson-orin-nano-8gb",
        "jetson-agx-orin-32gb",
        "jetson-agx-orin-64gb",
        "jetson-xavier-nx",
        "rtx-3060-12gb",
        "rtx-4090-24gb",
        "cpu-laptop",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem and profile.source == str(path)
    assert profile.description and "not measurements" in profile.notes
    assert profile.device_kind in device_profile.DEVICE_KINDS
    assert profile.emulate is not None and profile.emulate.memory_cap_bytes is not None
    assert profile.emulate.compute_slowdown >= 1.0
    assert (profile.memory_budget_bytes is None) != (profile.memory_reserve_bytes is None)


def test_shipped_profiles_emulate_a_heterogeneous_fleet() -> None:
    loaded = [load_profile(p) for p in SHIPPED]
    emulations = [p.emulate for p in loaded if p.emulate is not None]
    slowdowns = {e.compute_slowdown for e in emulations}
    caps = {e.memory_cap_bytes for e in emulations}
    assert min(slowdowns) == 1.0 and max(slowdowns) >= 3.0 and len(slowdowns) >= 5
    assert len(caps) >= 5
    by_name = {p.name: p for p in loaded}
    assert by_name["rtx-4090-24gb"].compute_slowdown(emulating=True) == 1.0
    assert by_name["jetson-orin-nano-8gb"].compute_slowdown(emulating=True) > 3.0


def test_precisions_match_the_quantization_module() -> None:
    assert set(device_profile.PRECISIONS) == {p.value for p in Precision}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "device.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "field", "value", "advice"),
    [
        ("colour: red", "colour", "'red'", "allowed here"),
        ("batch_sise: 4", "batch_sise", "4", "did you mean 'batch_size'"),
        ("emulate:\n  slowdown: 2", "emulate.slowdown", "2", "compute_slowdown"),
        ("batch_size: true", "batch_size", "True", "whole number"),
        ("max_tokens: '128'", "max_tokens", "'128'", "whole number"),
        ("max_tokens: 0", "max_tokens", "0", "at least 1"),
        ("memory_budget_bytes: -1", "memory_budget_bytes", "-1", "negative"),
        ("memory_budget_bytes: -2GiB", "memory_budget_bytes", "'-2GiB'", "size like"),
        ("memory_reserve_bytes: 6 gigs", "memory_reserve_bytes", "'6 gigs'", "size like"),
        ("memory_reserve_bytes: 1.5", "memory_reserve_bytes", "1.5", "byte count"),
        ("link_bandwidth_mbps: 0", "link_bandwidth_mbps", "0", "greater than 0"),
        ("link_bandwidth_mbps: fast", "link_bandwidth_mbps", "'fast'", "a number"),
        ("emulate:\n  compute_slowdown: 0", "emulate.compute_slowdown", "0", "greater than 0"),
        ("emulate:\n  compute_slowdown: .nan", "emulate.compute_slowdown", "nan", "finite"),
        ("emulate:\n  memory_cap_bytes: -5", "emulate.memory_cap_bytes", "-5", "negative"),
        ("emulate:\n  link_bandwidth_mbps: -1", "emulate.link_bandwidth_mbps", "-1", "greater than 0"),
        ("emulate: 3", "emulate", "3", "mapping"),
        ("precision: nf3", "precision", "'nf3'", "nf4, int8"),
        ("device_kind: tpu", "device_kind", "'tpu'", "cpu, cuda, jetson"),
        ("quantized_kernels: 'yes'", "quantized_kernels", "'yes'", "true or false"),
        ("description: 5", "description", "5", "text"),
        (
            "memory_budget_bytes: 6GiB\nmemory_reserve_bytes: 1GiB",
            "memory_reserve_bytes",
            "'1GiB'",
            "give one",
        ),
    ],
)
def test_bad_input_names_file_field_and_value(
    tmp_path: Path, body: str, field: str, value: str, advice: str
) -> None:
    path = _write(tmp_path, f"name: dev\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{field}'" in message
    assert value in message
    assert advice in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        ("description: no name\n", "missing field 'name'"),
        ("name: [unclosed\n", "not valid YAML at line"),
        ("name: ''\n", "must not be empty"),
    ],
)
def test_malformed_files_are_explained(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "nope.yaml")


def test_the_resolver_lists_exactly_the_repositorys_profiles() -> None:
    assert shipped_profile_names() == tuple(p.stem for p in SHIPPED)
    assert shipped_profile_folder().resolve() == (ROOT / "profiles").resolve()


def test_a_name_is_the_shipped_profile_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no profiles/ here
    shipped = ROOT / "profiles" / "jetson-orin-nano-8gb.yaml"
    for given in ("jetson-orin-nano-8gb", "jetson-orin-nano-8gb.yaml", Path("jetson-orin-nano-8gb")):
        assert resolve_profile(given).resolve() == shipped.resolve()
    assert load_profile("jetson-orin-nano-8gb").name == "jetson-orin-nano-8gb"


def test_an_existing_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("cpu-laptop.yaml").write_text("name: my-laptop\n")
    assert resolve_profile("cpu-laptop.yaml") == Path("cpu-laptop.yaml")
    assert load_profile("cpu-laptop.yaml").name == "my-laptop"
    assert load_profile("cpu-laptop").name == "cpu-laptop"  # a bare name is still the shipped one


@pytest.mark.parametrize("given", ["toaster-9000", "profiles/jetson-orin-nano-8gb.yaml", "nowhere/cpu-laptop"])
def test_an_unknown_profile_lists_the_shipped_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="profile file not found") as info:
        resolve_profile(given)
    assert given in str(info.value) and ", ".join(shipped_profile_names()) in str(info.value)


def test_defaults_and_sizes(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, "name: dev\nmemory_reserve_bytes: 512MiB\n"))
    assert profile == DeviceProfile(
        name="dev", source=str(tmp_path / "device.yaml"), memory_reserve_bytes=2**29
    )
    assert profile.precision == "nf4" and profile.quantized_kernels and profile.emulate is None
    assert parse_size("6GiB", "f", "x") == 6 * GiB
    assert parse_size("1.5 GB", "f", "x") == 1_500_000_000
    assert parse_size("1.2GiB", "f", "x") == round(1.2 * GiB)
    assert parse_size("100", "f", "x") == 100 == parse_size(100, "f", "x")
    assert parse_size("4kib", "f", "x") == 4096
    with pytest.raises(ConfigError, match="byte count"):
        parse_size(True, "f", "x")


def test_profiles_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        device_profile.DEFAULT_PROFILE.name = "x"  # type: ignore[misc]


def _profile(**fields: object) -> DeviceProfile:
    return DeviceProfile(name="dev", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "available", "emulating", "expected"),
    [
        ({}, 7 * GiB, False, 7 * GiB),  # nothing declared: what is free
        ({"memory_budget_bytes": 6 * GiB}, 4 * GiB, False, 4 * GiB),  # less free than the budget
        ({"memory_budget_bytes": 6 * GiB}, 8 * GiB, False, 6 * GiB),  # the budget caps it
        ({"memory_reserve_bytes": 2 * GiB}, 7 * GiB, False, 5 * GiB),  # free minus the reserve
        ({"memory_reserve_bytes": 2 * GiB}, 1 * GiB, False, 0),  # never negative
        (
            {"memory_reserve_bytes": 2 * GiB, "emulate": EmulationSettings(memory_cap_bytes=GiB + GiB // 5)},
            7 * GiB,
            True,
            GiB + GiB // 5,
        ),
        (
            {"memory_reserve_bytes": 2 * GiB, "emulate": EmulationSettings(memory_cap_bytes=GiB)},
            7 * GiB,
            False,  # the emulate section only counts when emulating
            5 * GiB,
        ),
        (
            {"memory_budget_bytes": 3 * GiB, "emulate": EmulationSettings(memory_cap_bytes=None)},
            8 * GiB,
            True,
            3 * GiB,
        ),
        (
            {"memory_budget_bytes": 3 * GiB, "emulate": EmulationSettings(memory_cap_bytes=5 * GiB)},
            8 * GiB,
            True,
            3 * GiB,
        ),
    ],
)
def test_combine_budget(fields: dict[str, object], available: int, emulating: bool, expected: int) -> None:
    assert combine_budget(_profile(**fields), available, 8 * GiB, emulating=emulating) == expected


def test_combine_budget_rejects_negative_measurements() -> None:
    with pytest.raises(ConfigError, match="negative"):
        combine_budget(_profile(), -1, 8 * GiB)


def test_emulated_link_and_slowdown_apply_only_when_emulating() -> None:
    profile = _profile(
        link_bandwidth_mbps=1000.0, emulate=EmulationSettings(compute_slowdown=3.0, link_bandwidth_mbps=20.0)
    )
    assert profile.link_bandwidth_bps() == 1e9 and profile.compute_slowdown() == 1.0
    assert (
        profile.link_bandwidth_bps(emulating=True) == 2e7 and profile.compute_slowdown(emulating=True) == 3.0
    )


def test_every_field_is_documented() -> None:
    doc = (ROOT / "docs" / "profiles.md").read_text()
    module_doc = device_profile.__doc__ or ""
    names = [f.name for f in dataclasses.fields(DeviceProfile) if f.name != "source"]
    names += [f"emulate.{f.name}" for f in dataclasses.fields(EmulationSettings)]
    for name in names:
        short = name.split(".")[-1]
        assert f"`{short}`" in doc, name
        assert f"``{short}``" in module_doc, name
