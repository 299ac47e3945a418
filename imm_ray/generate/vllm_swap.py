"""Swapping a checkpoint's weights into a running vLLM engine, correctly on the CPU backend too.

vLLM's ``reload_weights`` loads a checkpoint layer by layer and re-runs each layer's weight
processing. A layer that loads no tensor of its own is skipped: with tied embeddings that is the
LM head, whose weight *is* the embedding's (so it changes) but whose CPU GEMM kernel keeps the
weights it packed when the engine started. The swapped engine then scores every token with the old
model's head (measured: a tiny model's answers changed from the first token, the embedded SmolLM2
answered 8 of 48 GSM8K questions as the base model did). :class:`WeightSwap` re-packs such kernels
after the reload; the swapped engine then equals a fresh one (tests/integration/test_engines.py).
"""

from __future__ import annotations

#: ``worker_extension_cls`` of every engine this package starts.
EXTENSION = f"{__name__}.WeightSwap"


def repack_cpu_gemms(model) -> list[str]:
    """Rebuild the CPU GEMM kernel of every layer that kept its weight beside the packed copy
    (embeddings and LM heads); returns their names."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    repacked = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "cpu_linear") or weight is None or weight.ndim != 2 or weight.numel() == 0:
            continue  # not a CPU GEMM, or its weight lives only in the packed copy (reloaded with it)
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        repacked.append(name)
    return repacked


class WeightSwap:
    """vLLM worker extension (mixed into the worker class; reached with ``collective_rpc``)."""

    def imm_swap_weights(self, weights_path: str) -> list[str]:
        """``reload_weights`` from ``weights_path``, then the CPU kernels it leaves stale; returns
        the re-packed layers' names (logged by the caller: this runs in vLLM's worker process,
        where this package's logging is not set up)."""
        from vllm.platforms import current_platform

        self.reload_weights(weights_path=weights_path)
        return repack_cpu_gemms(self.model_runner.model) if current_platform.is_cpu() else []
