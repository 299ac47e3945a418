"""Layer importance: what a model loses when one decoder layer is skipped.

Skipping layer i makes it the identity on the residual stream (the layer is taken out of the
stack, so the KV cache and layer indices stay consistent during generation). Two measures:

* accuracy drop: greedy generation on probe problems, scored like the evaluation stage;
* loss rise (cheap proxy): mean token loss on known-correct reference solutions
  (prompt + solution, loss on the solution tokens only), forward passes only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from imm_ray.data.problems import Problem
from imm_ray.data.prompts import encode_prompt, render_prompt
from imm_ray.evaluate import score_completions
from imm_ray.train.sft_data import SFTRow

__all__ = ["LayerScore", "ProbeSpec", "PromptStyle", "decoder_layers",
           "generate_greedy", "layer_importance", "load_model", "probe_accuracy",
           "reference_loss", "render_probe_prompts", "skip_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptStyle:
    """How probe questions are rendered (the run's data.prompt_template and friends);
    instruction_suffix None means render_prompt's default."""

    template: str = "chat"
    system_prompt: str | None = None
    instruction_suffix: str | None = None

    def render(self, question: str, tokenizer: Any) -> str:
        kwargs: dict[str, Any] = {"system_prompt": self.system_prompt}
        if self.instruction_suffix is not None:
            kwargs["instruction_suffix"] = self.instruction_suffix
        return render_prompt(question, self.template, tokenizer, **kwargs)


@dataclass(frozen=True)
class ProbeSpec:
    """Everything a layer-importance task needs besides the model and the layers."""

    problems: tuple[Problem, ...] = ()
    references: tuple[SFTRow, ...] = ()
    """Known-correct solutions (the rows SFT trains on): the probe of the loss-based measures."""
    prompt: PromptStyle = PromptStyle()
    max_new_tokens: int = 256
    batch_size: int = 16
    verifier: str = "numeric"
    dtype: str = "float32"
    device: str = "cpu"
    stop_strings: tuple[str, ...] = ()


@dataclass
class LayerScore:
    """Probe results with one layer skipped (layer None: the unmodified model)."""

    layer: int | None
    accuracy: float | None = None
    correct: int | None = None
    loss: float | None = None
    seconds: float = 0.0
    completions: list[str] = field(default_factory=list)

    def to_dict(self, with_completions: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_completions:
            out.pop("completions")
        return out


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from an HF folder (a URI: this node's cached copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imm_ray.storage import materialize

    model_dir = materialize(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layer stack (``model.model.layers`` for Llama/Qwen/Mistral-style models)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer stack (.layers) found")
    return layers


@contextmanager
def skip_layers(model: Any, skip: Iterable[int]) -> Iterator[Any]:
    """Within the block, the given decoder layers are the identity on the residual stream.

    The layers are taken out of the stack; the remaining attention modules are renumbered
    and the config's layer count (and layer_types) follow, so generation with a KV cache
    stays correct. Everything is restored on exit.
    """
    skip = sorted(set(skip))
    if not skip:
        yield model
        return
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = decoder_layers(model)
    if skip[0] < 0 or skip[-1] >= len(layers):
        raise IndexError(f"layer(s) {skip} out of range for {len(layers)} layers")
    config = model.config.get_text_config(decoder=True)
    saved_count = config.num_hidden_layers
    saved_types = getattr(config, "layer_types", None)
    saved_idx = {i: getattr(getattr(layer, "self_attn", None), "layer_idx", None)
                 for i, layer in enumerate(layers)}
    kept = [i for i in range(len(layers)) if i not in skip]
    inner.layers = torch.nn.ModuleList([layers[i] for i in kept])
    try:
        for new_idx, old_idx in enumerate(kept):
            attn = getattr(layers[old_idx], "self_attn", None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = new_idx
        config.num_hidden_layers = len(kept)
        if isinstance(saved_types, list):
            config.layer_types = [saved_types[i] for i in kept]
        yield model
    finally:
        inner.layers = layers
        config.num_hidden_layers = saved_count
        if isinstance(saved_types, list):
            config.layer_types = saved_types
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if attn is not None and saved_idx[i] is not None:
                attn.layer_idx = saved_idx[i]


def _pad_left(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                    batch_size: int = 16, stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy completions (special tokens stripped, cut at the first stop string)."""
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _pad_left(prompts[start:start + batch_size], pad)
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:].cpu(), skip_special_tokens=True)
    return [_cut_at_stop(t, stop_strings) for t in texts]


def render_probe_prompts(problems: Sequence[Problem], style: PromptStyle, tokenizer: Any) -> list[list[int]]:
    """Token ids of each problem's prompt, as the generation/evaluation stages build them."""
    return [encode_prompt(tokenizer, style.render(p.question, tokenizer)) for p in problems]


def probe_accuracy(model: Any, tokenizer: Any, probe: ProbeSpec,
                   prompts: Sequence[list[int]] | None = None) -> tuple[float, int, list[str]]:
    """(accuracy, correct, completions) of greedy generation on the probe problems."""
    if prompts is None:
        prompts = render_probe_prompts(probe.problems, probe.prompt, tokenizer)
    texts = generate_greedy(model, tokenizer, prompts, probe.max_new_tokens, probe.batch_size,
                            probe.stop_strings)
    score = score_completions(probe.problems, texts, verifier=probe.verifier)
    return score.accuracy, score.correct, texts


def _reference_rows(tokenizer: Any, references: Sequence[SFTRow]) -> list[tuple[list[int], int]]:
    """(prompt + solution [+ eos] ids, prompt length) per reference."""
    eos = tokenizer.eos_token_id
    rows = []
    for ref in references:
        prompt = encode_prompt(tokenizer, ref.prompt)
        target = list(tokenizer(ref.completion, add_special_tokens=False)["input_ids"])
        if eos is not None:
            target.append(int(eos))
        rows.append((prompt + target, len(prompt)))
    return rows


def reference_loss(model: Any, tokenizer: Any, references: Sequence[SFTRow],
                   batch_size: int = 16) -> float | None:
    """Mean token cross-entropy of the reference solutions given their prompts (None if empty)."""
    rows = _reference_rows(tokenizer, references)
    if not rows:
        return None
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.full_like(ids, -100)
        for row, (seq, plen) in enumerate(batch):
            labels[row, plen:len(seq)] = ids[row, plen:len(seq)]
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shift_labels != -100).sum())
    return total / count if count else None


def layer_importance(model_dir: str | Path, layers: Sequence[int | None], probe: ProbeSpec,
                     generate: bool = True, loss: bool = True) -> list[LayerScore]:
    """Probe scores with each of ``layers`` skipped in turn (None = nothing skipped).

    Loads the model once; ``generate`` runs the accuracy probe, ``loss`` the reference-loss
    proxy. Completions are kept only for the unmodified model.
    """
    import time

    model, tokenizer = load_model(model_dir, probe.dtype, probe.device)
    prompts = render_probe_prompts(probe.problems, probe.prompt, tokenizer) if generate else []
    scores = []
    for layer in layers:
        t0 = time.perf_counter()
        score = LayerScore(layer)
        with skip_layers(model, [] if layer is None else [layer]):
            if generate and probe.problems:
                score.accuracy, score.correct, texts = probe_accuracy(model, tokenizer, probe, prompts)
                if layer is None:
                    score.completions = texts
            if loss and probe.references:
                score.loss = reference_loss(model, tokenizer, probe.references, probe.batch_size)
        score.seconds = round(time.perf_counter() - t0, 3)
        logger.info("%s: skip layer %s: accuracy %s, loss %s (%.1f s)", Path(model_dir).name,
                    layer, score.accuracy, None if score.loss is None else f"{score.loss:.4f}",
                    score.seconds)
        scores.append(score)
    return scores


def importance_table(baseline: LayerScore, skipped: Sequence[LayerScore]) -> list[dict[str, Any]]:
    """Per layer: accuracy, accuracy_drop (baseline - skipped), loss, loss_rise (skipped - base)."""
    rows = []
    for s in sorted(skipped, key=lambda s: s.layer if s.layer is not None else -1):
        drop = (baseline.accuracy - s.accuracy
                if baseline.accuracy is not None and s.accuracy is not None else None)
        rise = (s.loss - baseline.loss if baseline.loss is not None and s.loss is not None
                and math.isfinite(s.loss) else None)
        rows.append({"layer": s.layer, "accuracy": s.accuracy, "accuracy_drop": drop,
                     "loss": s.loss, "loss_rise": rise, "seconds": s.seconds})
    return rows
