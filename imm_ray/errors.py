"""Errors a user can fix (bad config, bad files, bad paths), and the wording of "unknown name" errors.

The ``imm`` command prints a :class:`UserError` as one line (its message) and exits 2; any other
exception also ends in one line and exit 2, with the traceback behind ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input the user can fix; the message names the thing that is wrong and how to fix it."""


def unknown_name(kind: str, name: object, known: Iterable[str]) -> str:
    """``unknown <kind> 'x' (did you mean 'y'?); choose from a, b, c`` (the hint only when one is close)."""
    choices = sorted(known)
    close = difflib.get_close_matches(str(name), choices, n=1) if isinstance(name, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; choose from {', '.join(choices) or '(none registered)'}"
