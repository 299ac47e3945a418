"""Environment for a local Ray head that listens on loopback only.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported: set it to 0 and Ray binds
127.0.0.1 instead of the machine's external interface. Ray 2.60 then turns token authentication
on by itself, so head and clients share ``RAY_AUTH_MODE=disabled``. Call
:func:`use_loopback_ray` before anything imports ``ray``.
"""

from __future__ import annotations

import os
import sys

LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def use_loopback_ray() -> bool:
    """Set the loopback environment (unless the user set it); return False if Ray was imported already."""
    for key, value in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(key, value)
    return "ray" not in sys.modules


def ray_binds_loopback() -> bool:
    """Whether the imported Ray will bind a local head to 127.0.0.1."""
    from ray._private import ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER
