"""`qwen-tune` entry point: subcommands are registered by their modules, errors print one clear line.

Each subcommand module imports torch / transformers / datasets inside its command function, so `--version`,
`--help` and `recipes` answer in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import io
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import Optional, Sequence

from .. import __version__

VERBOSE_ENV = "QWEN_TUNE_VERBOSE"
# Loggers of libraries whose INFO/WARNING chatter a user cannot act on (deprecations inside the libraries, "Setting
# pad_token_id", DeepSpeed's op builder, torch's pytree notices). Errors still show.
_QUIET_LOGGERS = ("transformers", "datasets", "deepspeed", "DeepSpeed", "torch", "accelerate", "peft", "torchao",
                  "huggingface_hub", "urllib3", "filelock", "fsspec", "bitsandbytes")


def build_parser() -> argparse.ArgumentParser:
    from . import data, train

    parser = argparse.ArgumentParser(prog="qwen-tune", description="Fine-tune Qwen chat models.")
    parser.add_argument("--version", action="version", version=f"qwen-tune {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help=f"show third-party warnings and logs (transformers, datasets, DeepSpeed, torch); "
                             f"also {VERBOSE_ENV}=1")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    train.add_parsers(sub)
    data.add_parser(sub)
    for name in ("export", "chat", "estimate", "quantize"):
        try:
            module = __import__(f"qwen_tune.cli.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    sub.add_parser("help", help="show this help (or `qwen-tune help COMMAND`)").add_argument("topic", nargs="?")
    sub.add_parser("version", help="print the version")
    return parser


class _QuietLogbar(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports logbar quietly when someone first imports it, then steps aside.

    gptqmodel (which peft's LoRA dispatcher imports whenever it is installed) prints its banner, a GIL notice and
    the environment variables it sets at INFO on stdout, through logbar's shared logger, and logbar's own import
    writes a blank line there. LogBar.shared() sets INFO when it first creates that logger: create it here, with
    stdout swallowed, at ERROR.
    """

    def __init__(self) -> None:
        self.inner: Optional[importlib.abc.Loader] = None

    def find_spec(self, name: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if name != "logbar":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    self.inner, spec.loader = spec.loader, self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.inner.exec_module(module)
            try:
                module.LogBar.shared().setLevel(logging.ERROR)
            except Exception:  # noqa: BLE001 - quieting a library must never break importing it
                pass


def quiet_third_party(verbose: bool) -> None:
    """Hide library warnings a user cannot act on, unless --verbose / QWEN_TUNE_VERBOSE=1.

    Environment variables cover libraries not imported yet (and the torchrun children, which inherit them).
    """
    if verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        return
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TORCH_CPP_LOG_LEVEL", "ERROR"),
                       ("DS_ACCELERATOR_LOG_LEVEL", "error"), ("TF_CPP_MIN_LOG_LEVEL", "3"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       # torch resets its loggers to WARNING when it loads; "-all" keeps them at ERROR
                       ("TORCH_LOGS", "-all"), ("GPTQMODEL_DISABLE_GIL_WARNING", "1")):
        os.environ.setdefault(var, value)
    if "logbar" in sys.modules:  # already imported (a caller of main()): its logger exists, only raise it
        logging.getLogger("logbar").setLevel(logging.ERROR)
    elif not any(isinstance(f, _QuietLogbar) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietLogbar())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("transformers", "datasets", "deepspeed", "torch", "accelerate", "peft", "torchao"):
            warnings.filterwarnings("ignore", category=category, module=module)


def _is_verbose(argv: list[str]) -> bool:
    return ("--verbose" in argv or "-v" in argv[:1]) or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_third_party(_is_verbose(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    from .train import route_overrides

    args = parser.parse_args(route_overrides(argv))
    if args.cmd in (None, "help"):
        topic = getattr(args, "topic", None)
        if topic:
            return main([topic, "--help"])
        parser.print_help()
        return 0
    if args.cmd == "version":
        print(f"qwen-tune {__version__}")
        return 0
    from ..config import ConfigError  # after parsing: `--help` and `version` never need pydantic
    from ..data.formats import DataError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `qwen-tune recipes | head`: the reader left; say nothing, as other CLIs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
