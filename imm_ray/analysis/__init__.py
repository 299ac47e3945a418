"""Layer analysis: relative parameter change per layer/module, layer importance by skipping
layers, and their rank correlation (no Ray here; see imm_ray.analysis.remote)."""

from imm_ray.analysis.change import (
    ChangeSummary,
    SquaredNorms,
    parameter_change,
    relative_change,
    squared_norms,
    summarize_changes,
)
from imm_ray.analysis.importance import (
    LayerScore,
    ProbeSpec,
    PromptStyle,
    layer_importance,
    reference_loss,
    skip_layers,
)
from imm_ray.analysis.names import TensorKey, parse_tensor_name
from imm_ray.analysis.pipeline import (
    AnalysisPlan,
    local_runner,
    run_analysis,
)
from imm_ray.analysis.probes import ModelEntry, discover_models, probe_from_run
from imm_ray.analysis.stats import rankdata, spearman

__all__ = [
    "AnalysisPlan",
    "ChangeSummary",
    "LayerScore",
    "ModelEntry",
    "ProbeSpec",
    "PromptStyle",
    "SquaredNorms",
    "TensorKey",
    "discover_models",
    "layer_importance",
    "local_runner",
    "parameter_change",
    "parse_tensor_name",
    "probe_from_run",
    "rankdata",
    "reference_loss",
    "relative_change",
    "run_analysis",
    "skip_layers",
    "spearman",
    "squared_norms",
    "summarize_changes",
]
