"""Entry point: `python -m tools.paymentsctl` and the `paymentsctl` console script."""

from __future__ import annotations

import sys

from tools.paymentsctl.cli import run


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
