"""Typed command configs: dataclass fields that double as ``--flags``."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        helptext = meta.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=helptext)
            continue
        kw: dict[str, Any] = {"help": helptext, "dest": f.name}
        if meta.get("positional"):
            parser.add_argument(f.name, nargs=meta.get("nargs"), metavar=meta.get("metavar"), help=helptext)
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
            if f.default is not None:
                kw["help"] += f" (default: {f.default})"
        type_name = f.type.split("|")[0].strip() if isinstance(f.type, str) else f.type.__name__
        kind = {"int": int, "float": float}.get(type_name)
        if kind:
            kw["type"] = kind
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kw)


def field(default: Any = dataclasses.MISSING, help: str = "", **meta: Any):
    """A config field with its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def jsonable(x: Any) -> Any:
    """``x`` with non-finite floats as None, so the output is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
