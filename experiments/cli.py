"""``python -m experiments COMMAND``: one typed config dataclass per command.

Each field of a config becomes a ``--flag`` whose help is the field's one-line
doc; ``--json`` prints one JSON object as the last line of output for scripts.
Bad input ends the command with one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from . import bench, benchmark, compare, train, tune
from . import costmodel
from .config import add_config_arguments, jsonable

COMMANDS: dict[str, Any] = {"bench": bench, "train": train, "tune": tune, "compare": compare,
                             "benchmark": benchmark}
COMMANDS["costmodel"] = costmodel


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m experiments",
                     description="schedgym: search loop schedules for tensor kernels and measure them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, module.Config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command]
    cfg = module.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(module.Config)})
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = module.run(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(cfg, "json", False):
        print(json.dumps(jsonable(result)))
    return 0 if result.get("correct", True) else 1
