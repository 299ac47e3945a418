"""Registry of merge methods.

A method declares its typed parameters (validated up front), how many models it takes, whether it
reads the anchor's weights, and a per-tensor ``merge_tensor`` working on fp32 tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .dare import RESCALE_MODES, task_vector_merge, weighted_average
from .errors import MergeError
from .params import ParamSpec, validate_params


class MergeMethod(ABC):
    """Base class of a merge method. Subclasses set the class attributes and ``merge_tensor``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    param_specs: ClassVar[tuple[ParamSpec, ...]] = ()
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    uses_anchor_weights: ClassVar[bool] = True
    uses_random: ClassVar[bool] = False

    def validate(self, params: Mapping[str, Any] | None, n_models: int) -> dict[str, Any]:
        """Check the model count and return the full validated parameter dict."""
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}"
                + ("" if self.max_models is None else f" and at most {self.max_models}")
            )
            raise MergeError(f"method {self.name!r} takes {want} model(s), got {n_models}")
        return validate_params(self.name, self.param_specs, params, n_models, self.check)

    def check(self, params: dict[str, Any]) -> None:
        """Cross-parameter checks (override if needed); raise MergeError."""

    @abstractmethod
    def merge_tensor(
        self,
        anchor: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        params: Mapping[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Merge one tensor. Inputs are fp32; ``anchor`` is None if ``uses_anchor_weights`` is False."""


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: type[MergeMethod] | MergeMethod, *, overwrite: bool = False):
    """Register a MergeMethod subclass or instance under its ``name``; usable as a class decorator."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, MergeMethod):
        raise MergeError(f"{method!r} is not a MergeMethod")
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name:
        raise MergeError(f"{method!r} has no name")
    if name in MERGE_METHODS and not overwrite:
        raise MergeError(f"merge method {name!r} is already registered")
    MERGE_METHODS[name] = instance
    return method


def get_merge_method(name: str) -> MergeMethod:
    """Look a method up by name; MergeError listing the known ones if it is unknown."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise MergeError(
            f"unknown merge method {name!r} (known: {', '.join(sorted(MERGE_METHODS))})"
        ) from None


# --- parameter specs shared by several methods -------------------------------------------------

def _drop_rate(default: float) -> ParamSpec:
    return ParamSpec(
        "drop_rate", float, default, "DARE drop probability p", low=0.0, high=1.0, high_inclusive=False
    )


_RESCALE = ParamSpec(
    "rescale",
    str,
    "exact",
    "DARE rescale: 'exact' = 1/(1-p) (MergeLM, the paper); 'l1' = mergekit-style L1-norm match; "
    "'none' = no rescale",
    choices=RESCALE_MODES,
)


def _equal_weights(n: int) -> list[float]:
    return [1.0 / n] * n


class TaskVectorMethod(MergeMethod):
    """``anchor + sum_i w_i * DARE_p(model_i - anchor)``; subclasses map their params onto it."""

    uses_random = True

    def core_args(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Return weights, drop_rate, rescale, normalize for ``task_vector_merge``."""
        raise NotImplementedError

    def merge_tensor(self, anchor, models, params, generator):
        if anchor is None:
            raise MergeError(f"method {self.name!r} needs the anchor's weights")
        return task_vector_merge(anchor, models, generator=generator, **self.core_args(params, len(models)))


@register_merge_method
class IMMMethod(TaskVectorMethod):
    """IMM: ``anchor + lam * DARE_p(model - anchor)`` (paper: lam=0.5, p=0.2, exact rescale)."""

    name = "imm"
    description = "Iterative Model Merging: anchor + lam * DARE_p(model - anchor)"
    min_models = 1
    max_models = 1
    param_specs = (
        ParamSpec("lam", float, 0.5, "scale of the (DARE-sparsified) update"),
        _drop_rate(0.2),
        _RESCALE,
    )

    def core_args(self, params, n_models):
        return {
            "weights": [params["lam"]],
            "drop_rate": params["drop_rate"],
            "rescale": params["rescale"],
            "normalize": False,
        }


@register_merge_method
class TaskArithmeticMethod(TaskVectorMethod):
    """Task arithmetic: ``anchor + lam * sum_i (model_i - anchor)``."""

    name = "task_arithmetic"
    description = "anchor + lam * sum_i (model_i - anchor)"
    uses_random = False
    param_specs = (ParamSpec("lam", float, 1.0, "scale of the summed task vectors"),)

    def core_args(self, params, n_models):
        return {"weights": [params["lam"]] * n_models, "drop_rate": 0.0, "normalize": False}


@register_merge_method
class DareLinearMethod(TaskVectorMethod):
    """DARE linear: ``anchor + sum_i w_i * DARE_p(model_i - anchor)`` (optionally / sum w_i)."""

    name = "dare_linear"
    description = "anchor + sum_i w_i * DARE_p(model_i - anchor)"
    param_specs = (
        ParamSpec("weights", "per_model", _equal_weights, "one weight per model (default 1/n each)"),
        _drop_rate(0.2),
        _RESCALE,
        ParamSpec("normalize", bool, False, "divide the weighted sum by sum(weights) (mergekit style)"),
    )

    def check(self, params):
        if params["normalize"] and sum(params["weights"]) == 0.0:
            raise MergeError("dare_linear: parameter 'weights' must not sum to 0 when normalize=true")

    def core_args(self, params, n_models):
        return {
            "weights": params["weights"],
            "drop_rate": params["drop_rate"],
            "rescale": params["rescale"],
            "normalize": params["normalize"],
        }


@register_merge_method
class LinearMethod(MergeMethod):
    """Linear: weighted average of the given models (the anchor only supplies config/tokenizer)."""

    name = "linear"
    description = "sum_i w_i * model_i / sum_i w_i (anchor weights unused)"
    uses_anchor_weights = False
    param_specs = (
        ParamSpec("weights", "per_model", _equal_weights, "one weight per model (default 1/n each)"),
        ParamSpec("normalize", bool, True, "divide by sum(weights)"),
    )

    def check(self, params):
        if params["normalize"] and sum(params["weights"]) == 0.0:
            raise MergeError("linear: parameter 'weights' must not sum to 0 when normalize=true")

    def merge_tensor(self, anchor, models, params, generator):
        return weighted_average(models, params["weights"], normalize=params["normalize"])
