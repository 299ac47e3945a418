"""The tensor names of Hugging Face checkpoints, in one table (pure: stdlib only).

Which decoder layer a tensor belongs to, which module type its name spells, and which tensors hold
the vocabulary. The merge engine (vocabulary checks, the depth of layerwise gradients) and the layer
analysis (module types and groups) read these patterns; nothing else spells them.
"""

from __future__ import annotations

import re

__all__ = ["BEFORE_LAYERS", "FINAL_NORMS", "LAYER", "MODULE_GROUPS", "MODULE_TYPES", "VOCAB_MATRIX",
           "VOCAB_MATRIX_HINT", "layer_index"]

# Layer containers of common architectures: model.layers.N (Llama/Qwen/Mistral), transformer.h.N
# (GPT-2), gpt_neox.layers.N, model.decoder.layers.N (OPT), blocks.N.
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# Canonical module type of the last module name before weight/bias (Llama-style names first).
MODULE_TYPES: dict[str, str] = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_o",
    "gate_proj": "mlp_gate", "up_proj": "mlp_up", "down_proj": "mlp_down",
    "input_layernorm": "norm_input", "post_attention_layernorm": "norm_post_attn",
    "embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "word_embeddings": "embed",
    "tok_embeddings": "embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
    "q_norm": "norm_q", "k_norm": "norm_k",
}

# Names of the final norm, outside the layer stack (module type "norm_final").
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")

# Coarse groups of module types (for summaries); anything else is "other".
MODULE_GROUPS: dict[str, str] = {
    "attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_o": "attention",
    "mlp_gate": "mlp", "mlp_up": "mlp", "mlp_down": "mlp",
    "norm_input": "norm", "norm_post_attn": "norm", "norm_final": "norm", "norm_q": "norm",
    "norm_k": "norm", "embed": "embedding", "lm_head": "embedding",
}

# The vocabulary matrices (input embeddings and LM heads: one row per token).
VOCAB_MATRIX = re.compile(
    r"(^|\.)(" + "|".join(name for name, kind in MODULE_TYPES.items() if kind in ("embed", "lm_head"))
    + r")\.weight$"
)
# Names that may hold a vocabulary matrix: one counts when its row count is the vocabulary size.
VOCAB_MATRIX_HINT = re.compile(r"embed|head")
# Tensors before the first decoder layer (token and position embeddings): depth 0 over the network.
BEFORE_LAYERS = re.compile(r"embed|wte|wpe")


def layer_index(name: str) -> int | None:
    """Decoder layer number in a tensor name (``model.layers.7.mlp...`` -> 7), else None."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None
