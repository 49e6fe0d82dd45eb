"""Device profiles: what an operator declares about a device, loaded from YAML and validated.

A profile is read by the edge service (``fedbe-edge profile --profile NAME|FILE``) and by the
simulations (to emulate a fleet). It declares what can not be measured (the link, how much
memory to leave to other work, the training shape) and what is expected (device kind, whether
bitsandbytes kernels run); the edge measures the rest and the measurement wins where both exist.

Fields (all optional except ``name``; see ``docs/profiles.md`` for the long form):

``name`` (str)
    Short identifier, e.g. ``jetson-orin-nano-8gb``; announced to the coordinator.
``description``, ``notes`` (str)
    Free text: what the device is, where the numbers come from.
``device_kind`` (``cpu`` | ``cuda`` | ``jetson``)
    What the operator expects the device to be. The probe decides; a mismatch is logged.
``memory_budget_bytes`` (int or size string such as ``"6GiB"``, ``"512MiB"``, ``"1.5 GB"``)
    At most this much memory for fedbe. Exclusive with ``memory_reserve_bytes``.
``memory_reserve_bytes`` (int or size string)
    Leave this much of the measured available memory to other work.
``link_bandwidth_mbps`` (number > 0, default 100)
    Uplink to the broker in megabits per second (10^6 bit/s).
``power_mode`` (str)
    Informational, e.g. ``"15W"`` or ``"MAXN"`` (Jetson nvpmodel); times are measured in it.
``quantized_kernels`` (bool, default true)
    Whether bitsandbytes' 4/8-bit kernels are expected to run. A tiny layer is still tried and
    the result decides; a mismatch is logged.
``precision`` (``nf4`` | ``int8`` | ``bf16`` | ``fp16`` | ``fp32``, default ``nf4``)
    Preferred precision of the frozen base (falls back to 16-bit when 4/8-bit does not run).
``batch_size``, ``max_tokens`` (int >= 1, defaults 8 and 128)
    The training shape at which memory and time are measured and announced.
``emulate`` (mapping; used only when simulating this device on another machine)
    ``memory_cap_bytes`` (int or size string): cap on the budget;
    ``compute_slowdown`` (number > 0, default 1): multiplies every measured time;
    ``link_bandwidth_mbps`` (number > 0): replaces ``link_bandwidth_mbps``.

Where a profile comes from (:func:`resolve_profile`, the one place that turns a ``--profile`` value
into a file): an existing YAML file is itself; otherwise a bare name such as ``jetson-orin-nano-8gb``
is the profile of that name that ships with fedbe. The shipped profiles are the repository's
``profiles/`` folder, installed as the data package ``fedbe_profiles`` (see pyproject.toml), so
names work from any working directory, in a wheel install as in a checkout.

The budget rule (:func:`combine_budget`): with ``memory_budget_bytes``, the smaller of it and the
measured available memory; with ``memory_reserve_bytes``, measured available minus the reserve;
with neither, the measured available memory; when emulating, also at most
``emulate.memory_cap_bytes``. Never below zero.
"""

from __future__ import annotations

import difflib
import importlib.resources
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedbe.errors import ConfigError

log = logging.getLogger(__name__)

DEVICE_KINDS = ("cpu", "cuda", "jetson")
PRECISIONS = ("nf4", "int8", "bf16", "fp16", "fp32")  # = fedbe.quantization.Precision values
DEFAULT_LINK_MBPS = 100.0
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_TOKENS = 128
PROFILE_PACKAGE = "fedbe_profiles"  # the repository's profiles/ folder, as installed (pyproject.toml)
_SOURCE_TREE = Path(__file__).resolve().parents[1]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class EmulationSettings:
    """How to imitate the device on another machine (simulation only; knobs, not measurements)."""

    memory_cap_bytes: int | None = None
    compute_slowdown: float = 1.0
    link_bandwidth_mbps: float | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """A validated device profile. ``source`` is the file it came from (for messages)."""

    name: str
    source: str = "<built-in>"
    description: str = ""
    notes: str = ""
    device_kind: str | None = None
    memory_budget_bytes: int | None = None
    memory_reserve_bytes: int | None = None
    link_bandwidth_mbps: float = DEFAULT_LINK_MBPS
    power_mode: str | None = None
    quantized_kernels: bool = True
    precision: str = "nf4"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: int = DEFAULT_MAX_TOKENS
    emulate: EmulationSettings | None = None

    def link_bandwidth_bps(self, emulating: bool = False) -> float:
        """Bits per second of the uplink; the emulated figure when emulating and one is given."""
        if emulating and self.emulate is not None and self.emulate.link_bandwidth_mbps is not None:
            return self.emulate.link_bandwidth_mbps * 1e6
        return self.link_bandwidth_mbps * 1e6

    def compute_slowdown(self, emulating: bool = False) -> float:
        return self.emulate.compute_slowdown if emulating and self.emulate is not None else 1.0


DEFAULT_PROFILE = DeviceProfile(
    name="this-device",
    description="No profile given: measured memory and compute, declared defaults for the rest.",
)


def parse_size(value: object, file: str, field: str) -> int:
    """A byte count from an int or a size string (``"6GiB"``, ``"512 MiB"``, ``"1.5GB"``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(file, field, value, "expected a byte count: a whole number or a size like '6GiB'")
    if isinstance(value, int):
        number: float = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise _bad(
                file, field, value, "expected a size like 6GiB, 512MiB, 1.5GB or a plain number of bytes"
            )
        number = float(match.group(1)) * _UNITS[unit]
    if number < 0:
        raise _bad(file, field, value, "a memory size can not be negative")
    return int(round(number))


def shipped_profile_folder() -> Path:
    """The folder of the device profiles that ship with fedbe.

    In a source tree (a checkout on ``PYTHONPATH``, or an editable install) it is the tree's own
    ``profiles/``; installed from a wheel it is the package :data:`PROFILE_PACKAGE`, found with
    :mod:`importlib.resources`.
    """
    if (_SOURCE_TREE / "pyproject.toml").is_file() and (_SOURCE_TREE / "profiles").is_dir():
        return _SOURCE_TREE / "profiles"
    try:
        folder = importlib.resources.files(PROFILE_PACKAGE)
    except ModuleNotFoundError:
        raise ConfigError(
            f"the device profiles that ship with fedbe (package {PROFILE_PACKAGE}) are not installed; "
            "reinstall fedbe, or pass --profile a YAML file"
        ) from None
    if not isinstance(folder, Path):  # a zip import: no file to hand to load_profile or fedbe-edge
        raise ConfigError(
            f"the shipped device profiles are inside {folder}, not in a folder; install fedbe unpacked "
            "(pip install), or pass --profile a YAML file"
        )
    return folder


def shipped_profile_names() -> tuple[str, ...]:
    """Names of the device profiles that ship with fedbe (``cpu-laptop``, ``jetson-orin-nano-8gb``, ...)."""
    return tuple(sorted(p.stem for p in shipped_profile_folder().glob("*.yaml")))


def resolve_profile(profile: str | Path) -> Path:
    """The YAML file of a device profile given as a file or as the name of a shipped one.

    An existing file is itself. Otherwise a bare name, with or without ``.yaml``
    (``jetson-orin-nano-8gb``), is the shipped profile of that name, whatever the working
    directory. Anything else is a :class:`ConfigError` that lists the shipped names.
    """
    text = str(profile)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.parent == Path(".") and not text.endswith(("/", "\\")):
        stem = path.stem if path.suffix in (".yaml", ".yml") else path.name
        shipped = shipped_profile_folder() / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(shipped_profile_names()) or "none installed"
    raise ConfigError(
        f"{text}: profile file not found, and no device profile of that name ships with fedbe; "
        f"pass an existing YAML file or one of the shipped names: {names}"
    )


def load_profile(profile: str | Path) -> DeviceProfile:
    """Read and validate a device profile, given as a YAML file or a shipped name (:func:`resolve_profile`).

    Every problem is a :class:`ConfigError` naming the file and the field.
    """
    path = resolve_profile(profile)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: can not read the profile: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{file}: the profile is empty; it needs at least 'name: ...'")
    return parse_profile(data, file)


_TOP_FIELDS = (
    "name", "description", "notes", "device_kind", "memory_budget_bytes", "memory_reserve_bytes",
    "link_bandwidth_mbps", "power_mode", "quantized_kernels", "precision", "batch_size", "max_tokens",
    "emulate",
)  # fmt: skip
_EMULATE_FIELDS = ("memory_cap_bytes", "compute_slowdown", "link_bandwidth_mbps")


def parse_profile(mapping: object, source_name: str) -> DeviceProfile:
    """Validate an already-parsed mapping (e.g. from YAML) into a :class:`DeviceProfile`."""
    data = _mapping(mapping, source_name, "", _TOP_FIELDS)
    if "name" not in data:
        raise ConfigError(f"{source_name}: missing field 'name'; add e.g. name: {Path(source_name).stem}")
    budget = reserve = None
    if data.get("memory_budget_bytes") is not None:
        budget = parse_size(data["memory_budget_bytes"], source_name, "memory_budget_bytes")
    if data.get("memory_reserve_bytes") is not None:
        reserve = parse_size(data["memory_reserve_bytes"], source_name, "memory_reserve_bytes")
    if budget is not None and reserve is not None:
        raise ConfigError(
            f"{source_name}: field 'memory_budget_bytes' ({data['memory_budget_bytes']!r}) and field "
            f"'memory_reserve_bytes' ({data['memory_reserve_bytes']!r}) are both set; give one: a budget "
            "caps fedbe's memory, a reserve leaves memory to other work"
        )
    return DeviceProfile(
        name=_text(data["name"], source_name, "name", required=True),
        source=source_name,
        description=_text(data.get("description", ""), source_name, "description"),
        notes=_text(data.get("notes", ""), source_name, "notes"),
        device_kind=_choice(data.get("device_kind"), source_name, "device_kind", DEVICE_KINDS),
        memory_budget_bytes=budget,
        memory_reserve_bytes=reserve,
        link_bandwidth_mbps=_positive(
            data.get("link_bandwidth_mbps", DEFAULT_LINK_MBPS), source_name, "link_bandwidth_mbps"
        ),
        power_mode=_text(data["power_mode"], source_name, "power_mode") if "power_mode" in data else None,
        quantized_kernels=_flag(data.get("quantized_kernels", True), source_name, "quantized_kernels"),
        precision=_choice(data.get("precision", "nf4"), source_name, "precision", PRECISIONS) or "nf4",
        batch_size=_count(data.get("batch_size", DEFAULT_BATCH_SIZE), source_name, "batch_size"),
        max_tokens=_count(data.get("max_tokens", DEFAULT_MAX_TOKENS), source_name, "max_tokens"),
        emulate=_emulation(data["emulate"], source_name) if data.get("emulate") is not None else None,
    )


def _emulation(value: object, file: str) -> EmulationSettings:
    data = _mapping(value, file, "emulate", _EMULATE_FIELDS)
    cap = data.get("memory_cap_bytes")
    link = data.get("link_bandwidth_mbps")
    return EmulationSettings(
        memory_cap_bytes=None if cap is None else parse_size(cap, file, "emulate.memory_cap_bytes"),
        compute_slowdown=_positive(data.get("compute_slowdown", 1.0), file, "emulate.compute_slowdown"),
        link_bandwidth_mbps=None if link is None else _positive(link, file, "emulate.link_bandwidth_mbps"),
    )


def combine_budget(
    profile: DeviceProfile,
    measured_available_bytes: int,
    measured_total_bytes: int,
    *,
    emulating: bool = False,
) -> int:
    """Memory fedbe may use: declared limits combined with what the device has free right now.

    * ``memory_budget_bytes`` set: ``min(budget, available)``;
    * ``memory_reserve_bytes`` set: ``available - reserve``;
    * neither: ``available``;
    * emulating with ``emulate.memory_cap_bytes``: additionally at most the cap.

    Never negative. ``measured_total_bytes`` only serves a warning when the profile declares more
    than the device has (a profile written for a bigger device).
    """
    if measured_available_bytes < 0 or measured_total_bytes < 0:
        raise ConfigError(
            f"measured memory can not be negative (available {measured_available_bytes}, "
            f"total {measured_total_bytes})"
        )
    budget = measured_available_bytes
    if profile.memory_budget_bytes is not None:
        if profile.memory_budget_bytes > measured_total_bytes and not emulating:
            log.warning(
                "profile %s declares a budget of %d bytes but this device has %d in all; using what is available",
                profile.name,
                profile.memory_budget_bytes,
                measured_total_bytes,
            )
        budget = min(profile.memory_budget_bytes, measured_available_bytes)
    elif profile.memory_reserve_bytes is not None:
        budget = measured_available_bytes - profile.memory_reserve_bytes
    if emulating and profile.emulate is not None and profile.emulate.memory_cap_bytes is not None:
        budget = min(budget, profile.emulate.memory_cap_bytes)
    if budget <= 0:
        log.warning(
            "profile %s leaves no memory for fedbe (available %d bytes, reserve %s)",
            profile.name,
            measured_available_bytes,
            profile.memory_reserve_bytes,
        )
    return max(budget, 0)


def format_bytes(n: int | float) -> str:
    """``1288490188`` -> ``'1.20 GiB'`` (for tables and messages)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _bad(file: str, field: str, value: object, what_to_do: str) -> ConfigError:
    return ConfigError(f"{file}: field '{field}' has invalid value {value!r}: {what_to_do}")


def _mapping(value: object, file: str, path: str, allowed: tuple[str, ...]) -> Mapping[str, object]:
    where = f"field '{path}'" if path else "the profile"
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{file}: {where} must be a mapping of 'key: value' lines, got {type(value).__name__} {value!r}"
        )
    for key in value:
        dotted = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"{file}: unknown field '{dotted}' (value {value[key]!r}); {hint}"
                f"allowed here: {', '.join(allowed)}"
            )
    return {str(k): v for k, v in value.items()}


def _text(value: object, file: str, field: str, *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(file, field, value, "expected text (quote it if YAML read it as something else)")
    if required and not value.strip():
        raise _bad(file, field, value, "must not be empty")
    return value


def _choice(value: object, file: str, field: str, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise _bad(file, field, value, f"choose one of {', '.join(choices)}")
    return value


def _flag(value: object, file: str, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(file, field, value, "expected true or false")
    return value


def _count(value: object, file: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(file, field, value, "expected a whole number")
    if value < 1:
        raise _bad(file, field, value, "must be at least 1")
    return value


def _positive(value: object, file: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(file, field, value, "expected a number")
    if not (math.isfinite(value) and value > 0):
        raise _bad(file, field, value, "must be a finite number greater than 0")
    return float(value)
