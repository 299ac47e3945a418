"""Model merging for IMM (pure: numpy + the safetensors layout; imports neither torch nor Ray).

``merge_checkpoints`` streams HF safetensors checkpoints block by block through a registered merge
method (``imm``, ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, ``slerp``) on all cores and publishes an HF folder atomically,
with a ``merge_provenance.json``.
"""

from .core import slerp, task_vector_merge, weighted_average
from .engine import PROVENANCE_FILE, check_compatible, merge_checkpoints
from .errors import MergeError
from .methods import MERGE_METHODS, MergeMethod, get_merge_method, register_merge_method
from .options import MergeOptions, MergeRecipe, merge_options
from .params import ParamSpec
from .rng import TensorRNG
from .sparsify import dare_drop, magnitude_mask, sparsify

__all__ = [
    "MERGE_METHODS",
    "PROVENANCE_FILE",
    "MergeError",
    "MergeMethod",
    "MergeOptions",
    "MergeRecipe",
    "ParamSpec",
    "TensorRNG",
    "check_compatible",
    "dare_drop",
    "get_merge_method",
    "magnitude_mask",
    "merge_checkpoints",
    "merge_options",
    "register_merge_method",
    "slerp",
    "sparsify",
    "task_vector_merge",
    "weighted_average",
]
