"""`qwen-tune` entry point: subcommands are registered by their modules, errors print one clear line."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__


def build_parser() -> argparse.ArgumentParser:
    from . import data, train

    parser = argparse.ArgumentParser(prog="qwen-tune", description="Fine-tune Qwen chat models.")
    parser.add_argument("--version", action="version", version=f"qwen-tune {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    train.add_parsers(sub)
    data.add_parser(sub)
    for name in ("export", "chat", "estimate", "quantize"):
        try:
            module = __import__(f"qwen_tune.cli.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError
    from ..data.formats import DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable / unwritable / full: name the path, not a traceback
        where = e.filename if e.filename is not None else ""
        print(f"error: {where}{': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from ..train.trainer import CheckpointSaveError, NonFiniteLossError

        if not isinstance(e, (NonFiniteLossError, CheckpointSaveError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 4
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
