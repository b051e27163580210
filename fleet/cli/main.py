"""The ``edgefleet`` operator command: entry point and dispatch.

The parser is in ``fleet.cli.parser`` (argparse and nothing heavier); each subcommand names
its handler as "module:function" and that module is imported only when the subcommand runs.
This module imports nothing but ``sys`` first, so that ``bundle verify`` can start hashing
the bundle (shared/bundle/speculative.py) before argparse and the verify path are imported.
Expected failures (any EdgefleetError, an unreachable fleet, an HTTP error, a missing file)
end as one line ``edgefleet: error: ...`` and exit 1; argparse answers bad usage with exit 2.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing and collections first
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser (``fleet.cli.parser.build_parser``): every command, or with ``argv`` only
    those it can reach."""
    from fleet.cli.parser import build_parser

    return build_parser(argv)


def _verify_file_guess(argv: Sequence[str]) -> str | None:
    """The FILE of ``bundle verify FILE --trust ROOT`` read off argv before argparse runs, or
    None for anything else (argparse still parses argv; this is only a head start)."""
    if list(argv[:2]) != ["bundle", "verify"]:
        return None
    files, rest = [], iter(argv[2:])
    for token in rest:
        if token == "--trust":
            next(rest, None)
        elif token.startswith("--trust="):
            continue
        elif token.startswith("-"):
            return None
        else:
            files.append(token)
    return files[0] if len(files) == 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    speculation = None
    guess = _verify_file_guess(argv)
    if guess is not None:
        # Hash the bundle's blobs on worker threads while the imports and the signature check
        # run; fleet.cli.bundle.verify uses the digests only for ranges it vetted itself.
        from shared.bundle.speculative import start

        speculation = start(guess)
    try:
        return _run(argv, speculation)
    finally:
        if speculation is not None:
            speculation.cancel()
            if as_program:
                # `bundle verify` is done and the process ends: spare the interpreter's
                # shutdown its collections over everything imported (~8 ms, docs/performance.md).
                # atexit handlers, module teardown and the flush of stdout/stderr still run.
                import gc

                gc.freeze()


def _run(argv: Sequence[str], speculation: object) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.speculation = speculation
    handler = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "group", None) or parser).print_help(sys.stderr)
        return EXIT_USAGE
    import importlib

    from fleet.cli.output import error
    from shared.errors import EdgefleetError

    module_name, func_name = handler.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or EXIT_OK)
    except EdgefleetError as exc:
        error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        error(f"{exc.strerror or exc}{where}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
