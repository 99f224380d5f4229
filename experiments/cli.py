"""``python -m experiments COMMAND``: one typed config dataclass per command.

Each field of a config becomes a ``--flag`` whose help is the field's one-line
doc; ``--json`` prints one JSON object as the last line of output for scripts.
Bad input ends the command with one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from typing import Any

from .config import add_config_arguments, jsonable

# command -> one-line help; a command's module (and what it imports: gymnasium, torch,
# CuPy) is loaded only when that command runs, so `bench` works where only numpy is.
COMMANDS: dict[str, str] = {
    "tune": "Tune one operator shape with at most --budget hardware measurements.",
    "train": "Train a MaskablePPO agent on an operator's shape family.",
    "compare": "Compare tuning runs: best GFLOPS against hardware measurements.",
    "tune-model": "Tune a whole PyTorch model's layers under one budget and run it with the kernels.",
    "apply": "Run a PyTorch model with the tuned kernels of a database (no tuning).",
    "bench": "Measure one schedule against the naive kernel and the vendor library.",
    "costmodel": "Train the learned cost model from tuning logs.",
    "benchmark": "Run a benchmark suite and write its section of BENCHMARKS.md.",
    "render": "Print the C or CUDA source a schedule generates (no hardware needed).",
    "convert-policy": "Convert an old pickled policy (.zip) you trust to weights + JSON.",
}


def command_module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{name.replace('-', '_')}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``command`` (the others only list their help line)."""
    parser = _Parser(prog="python -m experiments",
                     description="schedgym: search loop schedules for tensor kernels and measure them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, line in COMMANDS.items():
        p = sub.add_parser(name, help=line, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = command_module(name)
            p.description = module.__doc__
            add_config_arguments(p, module.Config)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    module = command_module(args.command)
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
