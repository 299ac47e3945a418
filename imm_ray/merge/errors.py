"""Errors raised by the merge engine."""

from __future__ import annotations

from imm_ray.errors import UnknownNameError, UserError


class MergeError(UserError):
    """A merge cannot be performed (bad method, parameters, inputs or a bad result).

    Raised before anything is published: when it comes from the engine, ``out_dir`` does not exist.
    """


class UnknownMergeMethodError(MergeError, UnknownNameError):
    """A merge method name that is not registered (a MergeError, and the registries' UnknownNameError)."""
