"""``fedbe-coordinator``: the coordinator daemon (allocation, aggregation, MQTT rounds).

Not built yet: it is the open coordinator issue. The command exists so the package layout and
entry points are fixed; it says what is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = (
    "fedbe-coordinator: the coordinator daemon of a fedbe federation. It will allocate new blocks to "
    "clients each round, aggregate each block over the clients that trained it, and export the "
    "trained model ('run', 'export'). Not implemented yet (open issue: coordinator); the pure pieces "
    "it will use (fedbe.blocks.weighted_average, fedbe.protocol) exist and are tested."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbe-coordinator", description=DESCRIPTION)
    parser.add_argument("command", nargs="?", choices=["run", "export"], help="not implemented yet")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    print(f"fedbe-coordinator {args.command}: not implemented yet (open issue: coordinator)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
