"""The seed's boolean flag spelling, shared by every command line that takes one.

The seed documents both `--t5_cpu` (bare: true) and `--t5_cpu false`, so a boolean flag takes an
optional value. The value stays text: the pydantic model it feeds (`GenerationParams`, the serve
args, the HTTP request) converts and checks it, so a bad value gets that model's message everywhere.
"""

from __future__ import annotations

import argparse


def add_bool_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *, default, help: str) -> None:
    """`--name` alone means true; `--name VALUE` passes VALUE on as text."""
    parser.add_argument(f"--{name}", nargs="?", const=True, default=default, metavar="BOOL", help=help)
