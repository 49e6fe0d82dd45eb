"""Reading one mapping of a YAML configuration field by field.

:class:`Fields` wraps one mapping (the top level, or a section such as ``broker``): each typed getter
reads a field with its default, checks it, and on a bad value raises
:class:`~fedbe.errors.ConfigError` naming the file, the dotted field path and the value, and saying
what to do. :meth:`Fields.finish` then refuses any field nobody read, with the nearest valid name, or
with where a removed field went (:data:`REMOVED_FIELDS`). :mod:`coordinator.config` builds the run
configuration with it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn, TypeVar

from fedbe.errors import CodecError, ConfigError
from fedbe.protocol import check_labels
from fedbe.recipe import in_interval, is_real

REQUIRED = object()  # the default of a field that must be given
_REJECTED = "measured and rejected, see docs/research.md"
# fields an older configuration may still carry: the error says where each went instead of "unknown"
REMOVED_FIELDS = {
    "training.identity_pull": _REJECTED,
    "training.rehearsal_rows": _REJECTED,
    "training.balance_form": f"the label-balanced loss has one form ({_REJECTED})",
    "training.context_blocks": "clients always run every new block, the ones they do not train frozen",
    "allocation.min_steps_fraction": _REJECTED,
    "training.labels": "it is the top-level field labels",
    "training.task_weights_level": "it is the top-level field download_level",
    "update_level": "it is upload_level",
}
_T = TypeVar("_T")


class Fields:
    """One mapping of the file being read: typed getters that fail with file, dotted path and value."""

    def __init__(self, data: object, where: str, source: str, base_dir: Path) -> None:
        self.where, self.source, self.base_dir = where, source, base_dir
        if not isinstance(data, Mapping):
            what = f"section {where!r}" if where else "the top level"
            raise ConfigError(
                f"{source}: {what} must be a mapping of 'field: value' lines, got {data!r}. "
                "See coordinator/example-run.yaml for the layout."
            )
        self.data: Mapping[object, object] = data
        self.seen: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, value: object, problem: str, fix: str) -> NoReturn:
        fix = fix if fix.endswith((".", "?")) else f"{fix}."
        raise ConfigError(f"{self.source}: {self.path(name)} {problem}, got {value!r}. {fix}")

    def raw(self, name: str, default: object) -> object:
        self.seen.add(name)
        value = self.data.get(name, default)
        if value is REQUIRED:
            close = difflib.get_close_matches(name, [str(k) for k in self.data], n=1)
            hint = f"Is {close[0]!r} a misspelling of it? " if close else ""
            raise ConfigError(
                f"{self.source}: required field {self.path(name)} is missing. "
                f"{hint}Add it (see coordinator/example-run.yaml)."
            )
        return value

    def integer(self, name: str, default: object, low: int) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, value, "must be a whole number", "Write it without quotes or a decimal point.")
        if value < low:
            self.fail(name, value, f"must be >= {low}", f"Choose a value >= {low}.")
        return value

    def optional_integer(self, name: str, default: int | None, low: int) -> int | None:
        return None if self.raw(name, default) is None else self.integer(name, default, low)

    def real(self, name: str, default: object, interval: str) -> float:
        """A number inside ``interval``, written like ``"(0, 1]"`` or ``"[0, inf)"``."""
        value = self.raw(name, default)
        if not is_real(value):
            self.fail(name, value, "must be a finite number", "Write a number such as 0.5 or 1e-4.")
        if not in_interval(value, interval):
            self.fail(name, value, f"must lie in {interval}", f"Choose a value in {interval}.")
        return float(value)

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or value not in options:
            self.fail(name, value, f"must be one of {', '.join(options)}", "Pick one of those names.")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(name, value, "must be true or false", "Write true or false without quotes.")
        return value

    def string(self, name: str, default: object) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(name, value, "must be a non-empty string", "Quote it if YAML reads it otherwise.")
        return value.strip()

    def labels(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Distinct label names a task can carry (:func:`fedbe.protocol.check_labels`), sorted."""
        value = self.raw(name, list(default))
        try:
            return tuple(sorted(check_labels(value, self.path(name))))
        except CodecError as exc:
            self.fail(name, value, f"is not a list of labels a task can carry ({exc})",
                      "Write a list of distinct label names such as [business, sports, tech], or [] to take "
                      "the labels the clients announce")  # fmt: skip

    def optional_string(self, name: str) -> str | None:
        return None if self.raw(name, None) is None else self.string(name, None)

    def file_path(self, name: str, default: object, *, must_exist: bool) -> Path | None:
        if self.raw(name, default) is None:
            return None
        path = Path(self.string(name, default)).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        if must_exist and not path.is_file():
            self.fail(name, str(path), "names no existing file", "Create the file or correct the path.")
        return path

    def section(self, name: str, build: Callable[[Fields], _T]) -> _T:
        """Build a nested section from its own fields (absent or null: all defaults)."""
        value = self.raw(name, None)
        fields = Fields({} if value is None else value, self.path(name), self.source, self.base_dir)
        result = build(fields)
        fields.finish()
        return result

    def finish(self) -> None:
        """Every field in the mapping must have been read: anything else is unknown (a typo, usually)."""
        for key in self.data:
            if key not in self.seen:
                name = str(key)
                if self.path(name) in REMOVED_FIELDS:
                    raise ConfigError(f"{self.source}: {self.path(name)} is no longer a setting: "
                                      f"{REMOVED_FIELDS[self.path(name)]}. Delete the line.")  # fmt: skip
                close = difflib.get_close_matches(name, sorted(self.seen), n=1)
                hint = f"Did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"{self.source}: unknown field {self.path(name)!r} (value {self.data[key]!r}). "
                    f"{hint}Valid fields here: {', '.join(sorted(self.seen))}."
                )
