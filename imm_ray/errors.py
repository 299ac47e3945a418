"""Errors a user can fix, and how the command line reports every failure (pure: stdlib only).

:func:`dispatch` runs a subcommand: a :class:`UserError` (bad config, bad checkpoint, bad flags)
is printed as its message, an OSError as the path, the reason and the fix, anything else as its
type and message; always one line on stderr and exit status 2, the traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import sys
import traceback
from collections.abc import Callable, Iterable

logger = logging.getLogger("imm_ray")

# What to do about an OSError, by errno.
_OS_ERROR_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose a writable path",
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space",
    errno.EEXIST: "remove it or choose another path",
    errno.EISDIR: "give a file, not a folder",
}


class UserError(Exception):
    """Bad input the user can fix; the message names the thing that is wrong and how to fix it."""


class UsageError(UserError, ValueError):
    """Command-line flags or settings that are missing or do not fit together; the message says which."""


class UnknownNameError(UserError, KeyError):
    """A name that is not in a registry (a KeyError whose text is the plain message, not its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_name(kind: str, name: object, known: Iterable[str]) -> str:
    """``unknown <kind> 'x' (did you mean 'y'?); choose from a, b, c`` (the hint only when one is close)."""
    choices = sorted(known)
    close = difflib.get_close_matches(str(name), choices, n=1) if isinstance(name, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; choose from {', '.join(choices) or '(none registered)'}"


def known_name(kind: str, name: str, known: Iterable[str]) -> str:
    """``name`` if it is one of ``known``, else a ValueError saying so (a pydantic validator's error)."""
    known = set(known)
    if name not in known:
        raise ValueError(unknown_name(kind, name, known))
    return name


def add_common_arguments(parser: argparse.ArgumentParser, before_command: bool = True) -> None:
    """``--log-level`` and ``--debug``, accepted before the subcommand and after it."""
    # After the subcommand the defaults are suppressed, so they do not undo a flag given before it.
    unset = {} if before_command else {"default": argparse.SUPPRESS}
    parser.add_argument("--log-level", **(unset or {"default": "INFO"}), help="logging level (default INFO)")
    parser.add_argument("--debug", action="store_true", **unset, help="show the traceback of a failure")


def describe_error(exc: BaseException) -> str:
    """One line naming what failed and how to fix it."""
    while isinstance(getattr(exc, "cause", None), Exception):  # a Ray task's error: its remote cause
        exc = exc.cause  # type: ignore[attr-defined]
    if isinstance(exc, UserError):
        text = str(exc)
    elif type(exc).__name__ == "ValidationError" and callable(getattr(exc, "errors", None)):  # pydantic's
        problems = [f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()]
        text = f"invalid {getattr(exc, 'title', 'settings')}: " + "; ".join(problems)
    elif isinstance(exc, OSError) and exc.strerror:
        thing = f"{exc.filename}: " if exc.filename is not None else ""
        fix = _OS_ERROR_FIXES.get(exc.errno or 0)
        text = f"{thing}{exc.strerror}" + (f" ({fix})" if fix else "")
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        text += " (rerun with --debug for the traceback)"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def dispatch(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, command: str) -> int:
    """Run a subcommand. Any failure ends as one line on stderr and exit status 2; ``args.debug``
    prints the traceback first. Ctrl-C (or SIGTERM in ``imm run``) exits 130."""
    try:
        return func(args)
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        sys.stderr.write(f"{command}: error: {describe_error(exc)}\n")
        return 2
