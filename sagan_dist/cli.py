"""`sagan-dist`: the command line. Each subcommand lives in the module that does the work.

A subcommand module provides ``configure_parser(parser)`` and ``run(args) -> int``, so each
command's options are documented next to the code that uses them; cli.py imports only the module
of the command being run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from sagan_dist.config import ConfigError
from sagan_dist.errors import Reported

COMMANDS = {
    "train": ("sagan_dist.train",
              "Train a class-conditional SAGAN: sagan-dist train CONFIG... [key=value ...]"),
    "sample": ("sagan_dist.sample",
               "Write images (one PNG each, {class}_{index}.png) and a grid from a checkpoint's EMA generator"),
    "attention": ("sagan_dist.attention_maps",
                  "Draw where each self-attention query looks (one PNG sheet per layer, maps.pt) for "
                  "a checkpoint's EMA generator, or its discriminator on real images"),
    "evaluate": ("sagan_dist.evaluation",
                 "Compute IS / FID / KID / precision-recall (torch-fidelity) and, with --classes, "
                 "intra-class FID of a checkpoint's EMA generator"),
    "make-shards": ("sagan_dist.data.shards",
                    "Write webdataset tar shards from an ImageFolder tree (e.g. ImageNet train)"),
    "sync": ("sagan_dist.tracking.sync",
             "Deliver MLflow records journaled in a run directory while the server was unreachable"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (for its options), so startup stays fast."""
    parser = argparse.ArgumentParser(
        prog="sagan-dist",
        description="Distributed training of class-conditional SAGAN (Self-Attention GAN).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch (and its OpenMP runtime) is imported: threads that wait for work sleep instead
    # of spinning, so a busy core (another process, a CPU limit below the node's cores) does not
    # stall every parallel region. Measured in benchmarks/contention.py. A user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ConfigError as e:
        print(f"sagan-dist {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except Reported as e:
        print(f"sagan-dist {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
