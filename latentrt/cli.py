"""The ``latentrt`` command. Each subcommand lives in :mod:`latentrt.commands` as a module with
``register(subparsers)`` and ``run(args) -> int``; heavy imports happen inside ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand modules, in the order ``latentrt --help`` lists them
COMMANDS = ["export", "generate", "info", "demo"]
COMMANDS += ["profiles", "build", "check"]  # GPU engines (issue 6)
COMMANDS += ["bench", "report"]  # benchmarks (issue 7)
COMMANDS += ["upscale"]  # latent x2 upscaler (issue 4)


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def _known_errors():
    from .manifest import BundleError
    from .runtime.engines.base import EngineCallError
    from .runtime.image import ImageInputError
    from .spec import SpecError

    errors = [UserError, BundleError, ImageInputError, SpecError, ValueError, TypeError, FileExistsError,
              FileNotFoundError, EngineCallError]
    export = sys.modules.get("latentrt.export.onnx_export")  # only loaded (with torch) by export commands
    if export is not None:
        errors.append(export.ExportError)
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="latentrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"latentrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"latentrt.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # known, user-fixable errors print one line; others keep their traceback
        if args.verbose or not isinstance(e, _known_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
