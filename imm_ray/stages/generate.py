"""The generate stage: k completions per training question, written as ``SampleRow``s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imm_ray.data import Problem
from imm_ray.generate.engine import SamplingSpec
from imm_ray.run.infos import GenerateInfo
from imm_ray.run.records import SampleRow
from imm_ray.stages.ports import Generator
from imm_ray.storage import Location, write_jsonl


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text (what SFT trains on) and its token ids (what the generator reads)."""

    text: str
    ids: list[int]


def generate(generator: Generator, problems: Sequence[Problem], prompts: Sequence[Prompt], sampling: SamplingSpec,
             out: Location, model: str, role: str = "student", gen_ids: Sequence[list[int]] | None = None,
             desc: str = "generate") -> GenerateInfo:
    """Complete each problem's prompt ``sampling.n`` times with ``generator`` (serving ``model`` as
    ``role``) and write the rows to ``out``. ``prompts`` are the student's, recorded with each row;
    ``gen_ids`` the ids the generator reads when it is another model (a teacher with its own template)."""
    ids = [p.ids for p in prompts] if gen_ids is None else list(gen_ids)
    outs = generator.generate(ids, sampling, desc=desc)
    rows = [
        SampleRow(
            problem_id=prob.id, dataset=prob.dataset, question=prob.question, gold=prob.answer,
            prompt=prompt.text, sample=j, completion=c.text, finish_reason=c.finish_reason,
            num_tokens=c.num_tokens,
            token_entropies=None if c.token_entropies is None else [round(e, 4) for e in c.token_entropies],
        )
        for prob, prompt, comps in zip(problems, prompts, outs)
        for j, c in enumerate(comps)
    ]
    write_jsonl(out, [r.to_json() for r in rows])
    stats = generator.last_stats
    return GenerateInfo(
        generated=len(rows), questions=len(problems), model=str(model), generator=role,
        sampling={"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                  "max_tokens": sampling.max_tokens, "greedy": sampling.greedy},
        truncated=sum(r.finish_reason == "length" for r in rows),
        tokens=sum(r.num_tokens for r in rows),
        tokens_per_s=round(stats.tokens_per_s, 1) if stats else 0.0,
        actor_retries=stats.retries if stats else 0,  # generator actors replaced mid-round
    )
