"""The ``hf`` engine: batched transformers ``generate``, for machines without vLLM."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from imm_ray.devices import engine_dtype
from imm_ray.generate.engine import Completion, Finished, SamplingSpec, collect, truncate_at_stop
from imm_ray.generate.entropy import token_entropy
from imm_ray.generate.settings import EngineSettings

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "auto": "auto"}


class HFEngine:
    """Left-padded batched generation with transformers."""

    def __init__(self, model_path: Path, options: EngineSettings) -> None:
        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = self._load_model(self.model_path)

    def _load_model(self, path: Path) -> torch.nn.Module:
        if self.options.dtype not in _DTYPES:
            raise ValueError(f"hf engine: unknown dtype {self.options.dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = engine_dtype(self.options.dtype, gpu=self.device == "cuda")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
        return model.to(self.device).eval()

    def load(self, model_path: Path) -> None:
        """Load another checkpoint (same tokenizer assumed)."""
        self.model = self._load_model(Path(model_path))
        self.model_path = Path(model_path)

    def close(self) -> None:
        """Drop the model."""
        self.model = None

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]  # a copy: never the config's own list
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted({i for i in ids if i is not None})

    def stream(self, prompts: list[list[int]], sampling: SamplingSpec,
               entropy: Sequence[bool] | None = None) -> Iterator[Finished]:
        """Generate in batches of about ``options.batch_size`` sequences (whole prompts, their
        ``n`` samples together), yielding each batch's prompts when it is done."""
        per_batch = max(1, self.options.batch_size // sampling.n)
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        for start in range(0, len(prompts), per_batch):
            stop = min(start + per_batch, len(prompts))
            wants = [entropy is None or entropy[i] for i in range(start, stop)]
            # transformers samples from torch's global RNG: seed a fork of it per batch, so that a
            # seeded call is reproducible batch by batch and the process's own RNG is left alone.
            with torch.random.fork_rng(devices=devices):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed * 1_000_003 + start)
                comps = self._generate_batch(prompts[start:stop], sampling, record=any(wants))
            yield [(start + j, [c if w else replace(c, token_entropies=None) for c in cs])
                   for j, (cs, w) in enumerate(zip(comps, wants))]

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Generate ``sampling.n`` completions per prompt."""
        return collect(self.stream(prompts, sampling), len(prompts))

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingSpec, record: bool) -> list[list[Completion]]:
        batch = [p for p in prompts for _ in range(sampling.n)]
        eos_ids = self._eos_ids()
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos_ids[0]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        kwargs = dict(max_new_tokens=sampling.max_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        recorder = _TopLogprobs(sampling.entropy_top_k) if record and sampling.entropy_top_k else None
        if recorder is not None:
            kwargs["logits_processor"] = LogitsProcessorList([recorder])
        gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        tops = torch.stack(recorder.steps, dim=1) if recorder is not None else None  # [batch, steps, k]
        out = [self._to_completion(row, eos_ids, sampling, None if tops is None else tops[r])
               for r, row in enumerate(gen[:, width:].tolist())]
        return [out[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _to_completion(self, row: list[int], eos_ids: list[int], sampling: SamplingSpec,
                       top_logprobs: torch.Tensor | None = None) -> Completion:
        stopped = False
        for j, tok in enumerate(row):
            if tok in eos_ids:
                row, stopped = row[:j], True
                break
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        text, hit = truncate_at_stop(text, sampling.stop)
        entropies = None
        if top_logprobs is not None:
            entropies = tuple(token_entropy(top_logprobs[j].tolist()) for j in range(len(row)))
        return Completion(text=text, finish_reason="stop" if (stopped or hit) else "length", num_tokens=len(row),
                          token_entropies=entropies)


class _TopLogprobs(LogitsProcessor):
    """Records the top-k log-probabilities of every decoding step (the model's own distribution:
    user processors run before the sampling warpers) and leaves the scores alone."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        self.steps.append(torch.topk(logprobs, min(self.k, logprobs.shape[-1]), dim=-1).values.cpu())
        return scores

