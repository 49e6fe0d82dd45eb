"""``fedbe-edge run --config FILE``: the run's settings from a YAML file, flags on top.

The file is a mapping whose keys are the long flags of ``fedbe-edge run`` with ``_`` for ``-``
(``broker``, ``client_id``, ``federation``, ``data``, ``model``, ``profile``, ``tls_ca``,
``tls_cert``, ``tls_key``, ``require_tls``, ``username``, ``password_file``, ...), derived from the
parser itself so that a new flag is a new key. ``fedbe-coordinator enroll`` writes one (``edge.yaml``).

* A flag given on the command line wins over the file's value.
* Relative paths are resolved against the file's folder, so a bundle can move as a whole; under
  systemd, ``--config %d/edge.yaml`` with every bundle file passed by ``LoadCredential=`` reads them
  all from ``$CREDENTIALS_DIRECTORY``. ``model`` and ``profile`` are resolved only where a file or
  folder of that name exists next to the config (otherwise they stay names, e.g. ``smollm2-135m``).
* An unknown key is an error that names it and lists the allowed ones; a value of the wrong type is
  an error that names the file, the key and the value.

Loading is plain validation over argparse's actions: no torch, no network.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Sequence
from pathlib import Path

import yaml

from fedbe.errors import ConfigError

# Flags that are not settings of a run.
NOT_IN_FILE = frozenset({"help", "config", "max_tasks"})
# Names or paths: resolved against the file's folder only where that file or folder exists.
NAME_OR_PATH = frozenset({"model", "profile"})
# What a run can not start without, with or without a file.
REQUIRED = ("broker", "client_id", "data")


def run_subparser(parser: argparse.ArgumentParser, command: str = "run") -> argparse.ArgumentParser:
    """The subparser of ``command`` in ``parser``."""
    for action in parser._actions:  # argparse keeps its subparsers there and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(command)
            if isinstance(found, argparse.ArgumentParser):
                return found
    raise LookupError(f"no {command!r} subcommand")


def file_keys(run: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a config file may set: every option of ``run`` but help, config and hidden ones."""
    return {a.dest: a for a in run._actions if a.option_strings and a.dest not in NOT_IN_FILE}


def _value(path: Path, key: str, value: object, action: argparse.Action) -> object:
    """``value`` as the type ``action`` produces, or :class:`ConfigError` naming file, key and value."""
    base = path.parent

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{path}: {key} must be {expected}, got {value!r}")

    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if action.type is Path:
        if not isinstance(value, str) or not value:
            raise wrong("a path (a string)")
        resolved = Path(value).expanduser()
        return resolved if resolved.is_absolute() else base / resolved
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        return value
    if action.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise wrong("a number")
        return float(value)
    if not isinstance(value, str) or not value:
        raise wrong("a string")
    if key in NAME_OR_PATH and not Path(value).is_absolute() and (base / value).exists():
        return str(base / value)
    return value


def load_run_file(path: Path, run: argparse.ArgumentParser) -> dict[str, object]:
    """The settings in ``path``, keyed by argparse dest and typed as the flags would be."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"can not read the config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of settings (key: value), got {type(data).__name__}")
    keys = file_keys(run)
    values: dict[str, object] = {}
    for key, value in data.items():
        if key not in keys:
            near = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"{path}: unknown key {key!r}{hint}; the keys are the flags of fedbe-edge run: "
                f"{', '.join(sorted(keys))}"
            )
        if value is not None:  # null: as if absent
            values[key] = _value(path, key, value, keys[key])
    return values


def parse_with_file(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, config: Path
) -> argparse.Namespace:
    """Parse ``argv`` again with the file's values as the defaults of ``run``: flags given win."""
    run = run_subparser(parser)
    run.set_defaults(**load_run_file(config, run))
    return parser.parse_args(argv)


def check_required(args: argparse.Namespace) -> None:
    """:class:`ConfigError` naming every setting a run needs that neither the flags nor the file gave."""
    missing = [key for key in REQUIRED if getattr(args, key, None) is None]
    if missing:
        flags = ", ".join("--" + key.replace("_", "-") for key in missing)
        raise ConfigError(
            f"fedbe-edge run needs {flags}: give them on the command line or as "
            f"{', '.join(missing)} in the --config file"
        )
