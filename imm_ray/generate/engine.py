"""The engine interface: token-id prompts in, n completions per prompt out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imm_ray.generate.settings import ENGINES, EngineSettings
from imm_ray.registry import import_entry


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
    # Entropy on every ``entropy_stride``-th prompt only (by its index in the round): a sample of
    # questions estimates the round's mean entropy for less of the engine's time.
    entropy_stride: int = 4

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
    # SamplingSpec.entropy_top_k most likely tokens, renormalised (generate.entropy.token_entropy).
    token_entropies: tuple[float, ...] | None = None


# A batch of finished prompts: (index of the prompt in the call, its ``n`` completions).
Finished = list[tuple[int, list[Completion]]]


class Engine(Protocol):
    """A loaded model that completes prompts."""

    model_path: Path

    def stream(self, prompts: list[list[int]], sampling: SamplingSpec,
               entropy: Sequence[bool] | None = None) -> Iterator[Finished]:
        """Complete all prompts at once, yielding each batch of finished prompts as it finishes.

        ``entropy[i]`` says whether prompt i reports token entropies (when
        ``sampling.entropy_top_k`` > 0); None: every prompt does.
        """
        ...

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt (given as token ids), in order."""
        ...

    def load(self, model_path: Path) -> None:
        """Switch to another checkpoint of the same architecture."""
        ...

    def close(self) -> None:
        """Release the model and any engine processes."""
        ...


def create_engine(name: str, model_path: str | Path, options: EngineSettings) -> Engine:
    """Build the engine called ``name`` (a key of :data:`ENGINES`, whose module is imported now) on
    ``model_path``; an UnknownNameError names the known engines."""
    return import_entry(ENGINES.lookup(name))(Path(model_path), options)


def collect(batches: Iterator[Finished], count: int) -> list[list[Completion]]:
    """Put the finished batches of a :meth:`Engine.stream` back in prompt order."""
    out: list[list[Completion] | None] = [None] * count
    for batch in batches:
        for i, comps in batch:
            out[i] = comps
    missing = [i for i, o in enumerate(out) if o is None]
    if missing:
        raise RuntimeError(f"the engine finished without completing prompts {missing[:10]}")
    return out  # type: ignore[return-value]


def entropy_mask(indices: Sequence[int], sampling: SamplingSpec) -> list[bool]:
    """Which of the prompts at these round indices report token entropies."""
    stride = max(1, sampling.entropy_stride)
    return [sampling.entropy_top_k > 0 and i % stride == 0 for i in indices]


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; return the text and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
