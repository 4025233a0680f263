"""``python -m data_prep``: the prep stage without the main CLI (same flags as ``semisup prep``)."""

from __future__ import annotations

import argparse
import sys

from data_prep.cli import add_arguments, run_cli


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``semisup prep`` does and run the prep stage; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data_prep")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
