"""Parse decoder-layer index and module type from Hugging Face tensor names (the names' table:
:mod:`imm_ray.merge.tensor_names`)."""

from __future__ import annotations

from dataclasses import dataclass

from imm_ray.merge.tensor_names import FINAL_NORMS, MODULE_GROUPS, MODULE_TYPES, layer_index

__all__ = ["MODULE_GROUPS", "TensorKey", "parse_tensor_name"]

_PARAM_SUFFIXES = ("weight", "bias")


@dataclass(frozen=True)
class TensorKey:
    """Where a tensor sits: its decoder layer (None outside the layer stack), module type, and
    parameter kind ("weight", "bias" or the raw last name component)."""

    layer: int | None
    module: str
    param: str

    @property
    def group(self) -> str:
        """Coarse group: attention, mlp, norm, embedding or other."""
        return MODULE_GROUPS.get(self.module, "other")


def parse_tensor_name(name: str) -> TensorKey:
    """``model.layers.12.self_attn.q_proj.weight`` -> TensorKey(12, "attn_q", "weight").

    Unknown module names keep their own last module component (e.g. "c_attn"); the final norm
    outside the layer stack (``model.norm.weight``) is "norm_final".
    """
    parts = name.split(".")
    param = parts[-1]
    modules = parts[:-1] if param in _PARAM_SUFFIXES and len(parts) > 1 else parts
    last = modules[-1] if modules else name
    layer = layer_index(name)
    module = MODULE_TYPES.get(last)
    if module is None:
        if layer is None and last in FINAL_NORMS:
            module = "norm_final"
        else:
            module = last
    return TensorKey(layer, module, param)
