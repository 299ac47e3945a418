"""Parse decoder-layer index and module type from Hugging Face tensor names."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MODULE_GROUPS", "TensorKey", "parse_tensor_name"]

# Layer containers used by common HF architectures: model.layers.N (Llama/Qwen/Mistral),
# transformer.h.N (GPT-2), gpt_neox.layers.N, model.decoder.layers.N (OPT), blocks.N.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")

# Canonical module type for the last module name before weight/bias (Llama-style names first).
_MODULE_TYPES: dict[str, str] = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_o",
    "gate_proj": "mlp_gate", "up_proj": "mlp_up", "down_proj": "mlp_down",
    "input_layernorm": "norm_input", "post_attention_layernorm": "norm_post_attn",
    "embed_tokens": "embed", "wte": "embed", "embed_in": "embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
    "q_norm": "norm_q", "k_norm": "norm_k",
}

# Coarse groups of module types (for summaries); anything else is "other".
MODULE_GROUPS: dict[str, str] = {
    "attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_o": "attention",
    "mlp_gate": "mlp", "mlp_up": "mlp", "mlp_down": "mlp",
    "norm_input": "norm", "norm_post_attn": "norm", "norm_final": "norm", "norm_q": "norm",
    "norm_k": "norm", "embed": "embedding", "lm_head": "embedding",
}

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
    match = _LAYER_RE.search(name)
    layer = int(match.group(1)) if match else None
    module = _MODULE_TYPES.get(last)
    if module is None:
        if layer is None and last in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            module = "norm_final"
        else:
            module = last
    return TensorKey(layer, module, param)
