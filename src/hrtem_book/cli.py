"""Command line: ``hrtem-book <command> ...``.

The pipeline's commands are defined in :mod:`hrtem_book.commands` and the book's in
:mod:`hrtem_book.book`, each through a ``register_cli(subparsers)`` function that imports nothing
heavy (a bad value is refused before torch is imported); this file only assembles them. Errors a
user can fix (a bad value, a missing file) exit with status 2 and one line naming the value and
what is allowed.

    hrtem-book simulate --series defocus --profile smoke
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .layout import storage_failure

# modules in data-flow order; a module that is missing or lacks register_cli is skipped
_COMMAND_MODULES = ("commands", "book")


class UserError(Exception):
    """An error caused by input the user can correct; printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as every other bad input: one line naming the value, exit 2 (no usage
    block before it; ``--help`` still prints the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or — given ``command`` — of the commands up to the module
    that owns it: ``campaign`` then never imports the book (a GPU image may lack its widgets)."""
    parser = OneLineParser(prog="hrtem-book", description=__doc__.splitlines()[0])
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
    except (OSError, RuntimeError) as exc:
        reason = storage_failure(exc)
        if reason is None:
            raise
        print(f"hrtem-book {args.command}: error: {reason}; finished work is kept: free space "
              "or give a writable --root, then run the command again", file=sys.stderr)  # fmt: skip
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
