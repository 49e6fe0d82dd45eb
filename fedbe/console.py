"""What every fedbe command line shares: logging set-up, dispatch with clean errors, stop signals.

Light on imports on purpose: ``--help`` of every command must stay instant.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from fedbe.errors import ConfigError, FedbeError


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file (a password, a token), stripped; :class:`ConfigError` naming
    ``what`` and the file when it can not be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"can not read {what} {path}: {exc}") from exc
    return lines[0].strip() if lines else ""


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 1, with a message that says what was wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0 (NaN and inf refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def setup_logging(level: int) -> None:
    """Log at ``level`` to stderr; silence bitsandbytes' per-call lines and transformers' progress bars."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - slow import, only when run

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def dispatch(
    prog: str, args: argparse.Namespace, commands: Mapping[str, Callable[[argparse.Namespace], int]]
) -> int:
    """Run ``args.command``: a :class:`FedbeError` becomes one line on stderr and exit code 1,
    Ctrl-C exit code 130; anything else is a bug and keeps its traceback."""
    try:
        return commands[args.command](args)
    except FedbeError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def stop_on_signals(log: logging.Logger, what: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a long-running loop to finish cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, what)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
