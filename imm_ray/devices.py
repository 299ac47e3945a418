"""What this machine's processor can do, where it changes how a model should run."""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

# Dtypes a CPU without bf16 instructions emulates: a bf16 GEMM took 70x the fp32 one on an AVX2 CPU
# (64 x 576 @ 576 x 1536: 98 ms against 1.4 ms), so an engine there runs in float32 instead.
_EMULATED_ON_PLAIN_CPUS = ("bfloat16", "bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX on x86; torch's private probes,
    the only ones it has)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def engine_dtype(dtype: str, gpu: bool) -> str:
    """The dtype an inference engine runs in: ``dtype``, except bfloat16 on a CPU without bf16
    instructions, which runs in float32 (the same answers up to rounding, at a usable speed), with a
    warning that says so."""
    if gpu or dtype not in _EMULATED_ON_PLAIN_CPUS or cpu_has_bf16():
        return dtype
    logger.warning("this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), where bfloat16 is emulated "
                   "and about 70x slower: the engine runs in float32 instead of %s", dtype)
    return "float32"
