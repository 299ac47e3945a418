"""Model merging for IMM (pure: torch + safetensors, no Ray).

``merge_checkpoints`` streams HF safetensors checkpoints tensor by tensor through a registered merge
method (``imm``, ``linear``, ``task_arithmetic``, ``dare_linear``) and publishes an HF folder
atomically, with a ``merge_provenance.json``.
"""

from .dare import dare_drop, drop_mask, task_vector_merge, weighted_average
from .engine import PROVENANCE_FILE, check_compatible, merge_checkpoints
from .errors import MergeError
from .methods import MERGE_METHODS, MergeMethod, get_merge_method, register_merge_method
from .params import ParamSpec

__all__ = [
    "MERGE_METHODS",
    "PROVENANCE_FILE",
    "MergeError",
    "MergeMethod",
    "ParamSpec",
    "check_compatible",
    "dare_drop",
    "drop_mask",
    "get_merge_method",
    "merge_checkpoints",
    "register_merge_method",
    "task_vector_merge",
    "weighted_average",
]
