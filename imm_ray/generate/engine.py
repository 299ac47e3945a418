"""The engine interface: token-id prompts in, n completions per prompt out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: ``temperature == 0`` means greedy decoding."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = 0
    entropy_top_k: int = 0  # > 0: report each token's entropy over the top-k next-token log-probs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One generated continuation."""

    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    num_tokens: int
    # Per generated token: entropy (nats) of the model's next-token distribution over its
    # SamplingSpec.entropy_top_k most likely tokens, renormalised (evaluate.token_entropy).
    token_entropies: tuple[float, ...] | None = None


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings that do not change between rounds."""

    dtype: str = "bfloat16"
    max_model_len: int = 2048
    kv_cache_gb: float = 2.0
    batch_size: int = 16
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    """A loaded model that completes prompts."""

    model_path: Path

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt (given as token ids)."""
        ...

    def load(self, model_path: Path) -> None:
        """Switch to another checkpoint of the same architecture."""
        ...

    def close(self) -> None:
        """Release the model and any engine processes."""
        ...


EngineFactory = Callable[[Path, EngineOptions], Engine]
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Register an engine factory under ``name`` (a decorator)."""

    def wrap(factory: EngineFactory) -> EngineFactory:
        ENGINES[name] = factory
        return factory

    return wrap


def create_engine(name: str, model_path: str | Path, options: EngineOptions) -> Engine:
    """Build the engine called ``name`` on ``model_path``."""
    # Importing the modules registers the built-in engines; vLLM itself is imported lazily.
    from imm_ray.generate import hf_engine, vllm_engine  # noqa: F401

    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known engines: {sorted(ENGINES)}")
    return ENGINES[name](Path(model_path), options)


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; return the text and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
