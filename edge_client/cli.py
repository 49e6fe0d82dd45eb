"""``fedbe-edge``: the on-device service (profile the device, train assigned blocks, talk MQTT).

Not built yet: the device profiler and the MQTT agent are the open edge-service issue. The
command exists so the package layout and entry points are fixed; it says what is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = (
    "fedbe-edge: the on-device service of a fedbe federation. It will measure the device's memory, "
    "compute and label distribution ('profile') and run the MQTT agent that trains the new blocks the "
    "coordinator assigns ('run'). Neither subcommand is implemented yet (open issue: edge service); "
    "the local trainer they will use is edge_client.trainer, exercised today by `fedbe demo`."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbe-edge", description=DESCRIPTION)
    parser.add_argument("command", nargs="?", choices=["profile", "run"], help="not implemented yet")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    print(f"fedbe-edge {args.command}: not implemented yet (open issue: the edge service)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
