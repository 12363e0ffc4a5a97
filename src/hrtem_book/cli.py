"""Command line: ``hrtem-book <command> ...``.

Each pipeline module owns its sub-command through a ``register_cli(subparsers)`` function; this
file only assembles them in data-flow order. Errors a user can fix (a bad value, a missing file)
exit with status 2 and one line naming the value and what is allowed.

    hrtem-book simulate --series defocus --profile smoke
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules in data-flow order; a module that is missing or lacks register_cli is skipped
_COMMAND_MODULES = ("datasets", "runs", "sweep", "findings", "campaign", "book")


class UserError(Exception):
    """An error caused by input the user can correct; printed as one line, exit status 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or — given ``command`` — of the commands up to the module
    that owns it: ``campaign`` then never imports the book (a GPU image may lack its widgets)."""
    parser = argparse.ArgumentParser(prog="hrtem-book", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"hrtem_book.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hrtem_book.{name}":
                continue
            raise
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
        if command is not None and command in sub.choices:
            break
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"hrtem-book {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hrtem-book {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
