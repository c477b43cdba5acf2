"""`sagan-dist`: the command line. Each subcommand lives in the module that does the work.

A subcommand module provides ``configure_parser(parser)`` and ``run(args) -> int``; cli.py only
registers them, so each command's options are documented next to the code that uses them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from sagan_dist.config import ConfigError

COMMANDS = {
    "train": ("sagan_dist.train",
              "Train a class-conditional SAGAN: sagan-dist train CONFIG... [key=value ...]"),
    "sample": ("sagan_dist.sample",
               "Write images (one PNG each, {class}_{index}.png) and a grid from a checkpoint's EMA generator"),
    "evaluate": ("sagan_dist.evaluation",
                 "Compute IS / FID / KID (torch-fidelity) of a checkpoint's EMA generator"),
    "make-shards": ("sagan_dist.data.shards",
                    "Write webdataset tar shards from an ImageFolder tree (e.g. ImageNet train)"),
    "sync": ("sagan_dist.tracking",
             "Replay MLflow records spooled in a run directory while the server was unreachable"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagan-dist",
        description="Distributed training of class-conditional SAGAN (Self-Attention GAN).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).configure_parser(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        parser.error(f"command {args.command!r} is not available in this installation")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ConfigError as e:
        print(f"sagan-dist {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
