"""Text generation: the engine interface, the ``hf`` and ``vllm`` engines, Ray generator actors."""

from imm_ray.generate.engine import (
    Completion,
    Engine,
    SamplingSpec,
    create_engine,
)
from imm_ray.generate.settings import ENGINES, EngineSettings

__all__ = ["ENGINES", "Completion", "Engine", "EngineSettings", "SamplingSpec", "create_engine"]
