"""The ``medsegdiff`` command line: a thin layer over the library.

Each sub-command lives in ``medsegdiff/commands/<name>.py`` and provides ``add_arguments(parser)``
and ``run(args) -> int``; its one-line help is :data:`medsegdiff.commands.COMMANDS`. Only the
chosen command's module is imported (see :func:`build_parser`), so ``medsegdiff --help`` stays fast.
Expected mistakes (:class:`MedSegDiffError`) and file-system faults of the environment (read-only
folder, full disk, no permission; see :func:`~medsegdiff.errors.describe_os_error`) are printed as
one line on stderr with exit status 2, without a traceback. A closed output pipe
(``medsegdiff config --keys | head``) ends the command quietly with status 141 (128 + SIGPIPE), as
Unix tools do.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from medsegdiff import __version__
from medsegdiff.commands import COMMANDS
from medsegdiff.errors import MedSegDiffError, describe_os_error

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what the shell reports for `yes | head`


def available_commands() -> list[str]:
    return [c for c in COMMANDS if importlib.util.find_spec(f"medsegdiff.commands.{c}") is not None]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the sub-commands only the one named in ``argv`` gets its arguments.

    Command modules import torch and the library at their top. They are imported here, lazily and
    only for the chosen command, so that ``medsegdiff --help`` (and a mistyped command) answers at once.
    """
    chosen = next((a for a in (argv or ()) if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="medsegdiff",
        description="Diffusion segmentation (MedSegDiff V1/V2) of stroke lesions in ISLES24 CT.",
    )
    parser.add_argument("--version", action="version", version=f"medsegdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in available_commands():
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        if name == chosen:
            module = importlib.import_module(f"medsegdiff.commands.{name}")  # lazy: see the docstring
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling a positional `overrides` list at the first option, so
        # `prepare DATA --out CACHE data.image_size=128` leaves the override over: keep key=value ones.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except MedSegDiffError as err:
        return _fail(args.command, str(err))
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        return _fail(args.command, message)
    except KeyboardInterrupt:
        print(f"medsegdiff {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, message: str) -> int:
    """Print ``message`` as the one error line of ``command`` and return the exit status 2."""
    print(f"medsegdiff {command}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
