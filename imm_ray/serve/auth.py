"""Optional API keys: ``Authorization: Bearer <key>``, compared in constant time."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

API_KEYS_ENV = "IMM_API_KEYS"


def load_api_keys(keys_file: str | Path | None = None, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from ``$IMM_API_KEYS`` (comma-separated) and a file (one per line, ``#`` comments)."""
    env = os.environ if env is None else env
    keys = [k.strip() for k in env.get(API_KEYS_ENV, "").split(",")]
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"API keys file {path} does not exist (serve.api_keys_file)")
        keys += [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return tuple(dict.fromkeys(k for k in keys if k))


class KeyChecker:
    """Accepts every request when no key is configured, else a matching bearer token."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value grants access."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: the time does not tell which key nearly matched
            ok |= hmac.compare_digest(given, key)
        return ok
