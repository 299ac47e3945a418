"""Registry of merge methods.

A method declares its typed parameters (validated up front), how many models it takes, whether it
reads the anchor's weights, whether it is elementwise (then the engine may feed it flat row blocks
of a tensor instead of whole tensors) and a per-tensor ``merge_tensor`` working on float32 numpy arrays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from imm_ray.registry import Registry

from .core import slerp, task_vector_merge, weighted_average
from .errors import MergeError, UnknownMergeMethodError
from .params import ParamSpec, validate_params
from .rng import TensorRNG
from .sparsify import RESCALE_MODES


class MergeMethod(ABC):
    """Base class of a merge method. Subclasses set the class attributes and ``merge_tensor``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    param_specs: ClassVar[tuple[ParamSpec, ...]] = ()
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    uses_anchor_weights: ClassVar[bool] = True
    uses_random: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False

    def is_elementwise(self, params: Mapping[str, Any]) -> bool:
        """True if each output entry depends only on the same entry of the inputs (for these params):
        the engine may then call ``merge_tensor`` on flat blocks (``rng`` shifted to the block)."""
        return self.elementwise

    @property
    def layerwise_params(self) -> tuple[str, ...]:
        """Names of the parameters that accept a depth gradient."""
        return tuple(spec.name for spec in self.param_specs if spec.layerwise)

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
        anchor: np.ndarray | None,
        models: Sequence[np.ndarray],
        params: Mapping[str, Any],
        rng: TensorRNG,
    ) -> np.ndarray:
        """Merge one tensor (or one flat block of it, for elementwise methods). Inputs are fp32
        scratch copies owned by the engine: a method may overwrite the ``models`` tensors and return
        one of them (never the anchor). ``anchor`` is None if ``uses_anchor_weights`` is False;
        ``params`` hold scalars (depth gradients already evaluated for this tensor)."""


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", UnknownMergeMethodError)


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
    MERGE_METHODS.add(name, instance, overwrite=True)
    return method


def get_merge_method(name: str) -> MergeMethod:
    """Look a method up by name; an UnknownMergeMethodError naming the known ones if it is unknown."""
    return MERGE_METHODS.lookup(name)


# --- parameter specs shared by several methods -------------------------------------------------

# The paper's IMM merge (lam, DARE drop rate p); p is also the default of every method that drops at random.
IMM_LAM = 0.5
DROP_RATE = 0.2

def _lam(default: float) -> ParamSpec:
    return ParamSpec("lam", float, default, "scale of the merged task vector (or a depth gradient)", layerwise=True)


def _drop_rate(default: float) -> ParamSpec:
    return ParamSpec("drop_rate", float, default, "DARE drop probability p (or a depth gradient)",
                     low=0.0, high=1.0, high_inclusive=False, layerwise=True)


def _density(default: float) -> ParamSpec:
    return ParamSpec("density", float, default, "fraction of each task vector kept, by magnitude",
                     low=0.0, high=1.0, layerwise=True)


def _weights(default: Any, doc: str = "one weight per model") -> ParamSpec:
    return ParamSpec("weights", "per_model", default, doc)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, "divide by the sum of the (agreeing) weights")


_RESCALE = ParamSpec(
    "rescale",
    str,
    "exact",
    "DARE rescale: 'exact' = 1/(1-p) (MergeLM, the paper); 'l1' = mergekit's L1-norm match; "
    "'none' = no rescale",
    choices=RESCALE_MODES,
)
_GAMMA = ParamSpec("gamma", float, 0.01, "fraction of largest-magnitude entries removed (outliers)",
                   low=0.0, high=1.0, layerwise=True)


def _breadcrumbs_params(normalize: bool) -> tuple[ParamSpec, ...]:
    return (_weights(_unit_weights, "per-model weight (default 1)"), _density(0.9), _GAMMA, _lam(1.0),
            _normalize(normalize))


def _equal_weights(n: int) -> list[float]:
    return [1.0 / n] * n


def _unit_weights(n: int) -> list[float]:
    return [1.0] * n


def _check_normalizable(method: str, params: Mapping[str, Any]) -> None:
    if params.get("normalize") and "weights" in params and sum(params["weights"]) == 0.0:
        raise MergeError(f"{method}: parameter 'weights' must not sum to 0 when normalize=true")


class TaskVectorMethod(MergeMethod):
    """A preset of :func:`task_vector_merge`: subclasses pick the sparsification and consensus and
    declare the parameters they expose (missing ones take the core's neutral value)."""

    sparsification: ClassVar[str] = "none"
    consensus: ClassVar[str] = "none"

    @property
    def uses_random(self) -> bool:  # type: ignore[override]
        return self.sparsification == "random"

    def check(self, params: dict[str, Any]) -> None:
        _check_normalizable(self.name, params)

    def is_elementwise(self, params: Mapping[str, Any]) -> bool:
        return self.sparsification in ("none", "random") and params.get("rescale", "exact") != "l1"

    def merge_tensor(self, anchor, models, params, rng):
        if anchor is None:
            raise MergeError(f"method {self.name!r} needs the anchor's weights")
        return task_vector_merge(
            anchor,
            models,
            params.get("weights") or [1.0] * len(models),
            lam=params.get("lam", 1.0),
            sparsification=self.sparsification,
            density=params.get("density", 1.0),
            drop_rate=params.get("drop_rate", 0.0),
            gamma=params.get("gamma", 0.0),
            rescale=params.get("rescale", "exact"),
            consensus=self.consensus,
            normalize=params.get("normalize", False),
            rng=rng,
            inplace=True,
        )


@register_merge_method
class IMMMethod(TaskVectorMethod):
    """IMM: ``anchor + lam * DARE_p(model - anchor)`` (paper: lam=0.5, p=0.2, exact rescale)."""

    name = "imm"
    description = "Iterative Model Merging: anchor + lam * DARE_p(model - anchor)"
    min_models = max_models = 1
    sparsification = "random"
    param_specs = (_lam(IMM_LAM), _drop_rate(DROP_RATE), _RESCALE)


@register_merge_method
class TaskArithmeticMethod(TaskVectorMethod):
    """Task arithmetic: ``anchor + lam * sum_i w_i (model_i - anchor)``."""

    name = "task_arithmetic"
    description = "anchor + lam * sum_i w_i (model_i - anchor)"
    param_specs = (_lam(1.0), _weights(_unit_weights, "per-model weight (default 1)"), _normalize(False))


@register_merge_method
class DareLinearMethod(TaskVectorMethod):
    """DARE linear: ``anchor + lam * sum_i w_i DARE_p(model_i - anchor)`` (optionally / sum w_i)."""

    name = "dare_linear"
    description = "anchor + lam * sum_i w_i * DARE_p(model_i - anchor)"
    sparsification = "random"
    param_specs = (_weights(_equal_weights, "per-model weight (default 1/n)"), _drop_rate(DROP_RATE), _RESCALE,
                   _normalize(False), _lam(1.0))


@register_merge_method
class TiesMethod(TaskVectorMethod):
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint mean."""

    name = "ties"
    description = "anchor + lam * disjoint_mean(sign-consensus(top-k(model_i - anchor)))"
    sparsification = "magnitude"
    consensus = "ties"
    param_specs = (_weights(_unit_weights, "per-model weight (default 1)"), _density(0.2), _lam(1.0),
                   _normalize(True))


@register_merge_method
class DareTiesMethod(TaskVectorMethod):
    """DARE-TIES: DARE drop/rescale, then TIES sign election and disjoint mean."""

    name = "dare_ties"
    description = "anchor + lam * disjoint_mean(sign-consensus(DARE_p(model_i - anchor)))"
    sparsification = "random"
    consensus = "ties"
    param_specs = (_weights(_unit_weights, "per-model weight (default 1)"), _drop_rate(DROP_RATE), _RESCALE,
                   _lam(1.0), _normalize(True))


@register_merge_method
class BreadcrumbsMethod(TaskVectorMethod):
    """Model Breadcrumbs: drop the largest ``gamma`` and smallest entries of each task vector,
    keeping ``density``; then task arithmetic."""

    name = "breadcrumbs"
    description = "anchor + lam * sum_i w_i breadcrumbs(model_i - anchor)"
    sparsification = "breadcrumbs"
    param_specs = _breadcrumbs_params(normalize=False)


@register_merge_method
class BreadcrumbsTiesMethod(BreadcrumbsMethod):
    """Breadcrumbs sparsification with TIES sign consensus and disjoint mean."""

    name = "breadcrumbs_ties"
    description = "anchor + lam * disjoint_mean(sign-consensus(breadcrumbs(model_i - anchor)))"
    consensus = "ties"
    param_specs = _breadcrumbs_params(normalize=True)


@register_merge_method
class LinearMethod(MergeMethod):
    """Linear: weighted average of the given models (the anchor only supplies config/tokenizer)."""

    name = "linear"
    description = "sum_i w_i * model_i / sum_i w_i (anchor weights unused)"
    uses_anchor_weights = False
    elementwise = True
    param_specs = (_weights(_equal_weights, "per-model weight (default 1/n)"), _normalize(True))

    def check(self, params):
        _check_normalizable(self.name, params)

    def merge_tensor(self, anchor, models, params, rng):
        return weighted_average(models, params["weights"], normalize=params["normalize"], inplace=True)


@register_merge_method
class SlerpMethod(MergeMethod):
    """SLERP from the anchor (t = 0) to the model (t = 1), per tensor (mergekit's formula)."""

    name = "slerp"
    description = "spherical interpolation anchor -> model by t (per tensor)"
    min_models = max_models = 1
    param_specs = (ParamSpec("t", float, 0.5, "interpolation factor (0 = anchor), or a depth gradient",
                             low=0.0, high=1.0, layerwise=True),)

    def merge_tensor(self, anchor, models, params, rng):
        return slerp(params["t"], anchor, models[0])
