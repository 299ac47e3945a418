"""The ``judge`` verifier: an LLM reads each question and sampled answer and ends with a verdict token.

It runs on the same engine layer as the generators (:mod:`imm_ray.generate.engine`: vLLM, or hf
for tests). An answer's score is the share of its ``samples`` judgements whose last verdict line
says yes (a judgement without one counts as no); it is accepted when the score reaches
``threshold``. Every verdict keeps the judge's text (``Verdict.note``) for the run's records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imm_ray.generate.engine import Engine, SamplingSpec, collect, create_engine
from imm_ray.generate.settings import EngineSettings
from imm_ray.verify.answers import extract_answer
from imm_ray.verify.verifiers import Verdict, register_verifier

__all__ = ["DEFAULT_JUDGE_PROMPT", "JudgeVerifier", "parse_verdict"]

DEFAULT_JUDGE_PROMPT = (
    "You are grading a student's solution to a math problem.\n\n"
    "Problem:\n{question}\n\n"
    "Student's solution:\n{answer}\n\n"
    "Check the reasoning and the final answer in a few sentences. Then write one last line: "
    "'Verdict: yes' if the final answer is correct, or 'Verdict: no' if it is not."
)
_VERDICT = re.compile(r"verdict\s*:?\s*\**\s*(yes|no)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """The judge's last 'Verdict: yes|no' (True for yes); None when the text holds none."""
    matches = _VERDICT.findall(text)
    return matches[-1].lower() == "yes" if matches else None


class JudgeVerifier:
    """Grade sample rows (``question``, ``completion``) with an LLM; no gold answer is read."""

    name = "judge"
    needs_gold = False

    def __init__(self, model_path: str | Path, engine: EngineSettings, prompt: str = DEFAULT_JUDGE_PROMPT,
                 max_tokens: int = 256, samples: int = 1, temperature: float = 0.0, threshold: float = 0.5) -> None:
        """Load the judge model at ``model_path`` (a local folder) into the engine ``engine`` names."""
        from transformers import AutoTokenizer

        if "{question}" not in prompt or "{answer}" not in prompt:
            raise ValueError("the judge prompt needs the placeholders {question} and {answer}")
        self.prompt, self.threshold = prompt, threshold
        self.sampling = SamplingSpec(n=samples, temperature=temperature, max_tokens=max_tokens, seed=engine.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine: Engine = create_engine(engine.name, model_path, engine)

    def close(self) -> None:
        """Release the judge's engine."""
        self.engine.close()

    def _prompt_ids(self, row: dict[str, Any]) -> list[int]:
        from imm_ray.data.prompts import encode_prompt, render_prompt

        text = self.prompt.replace("{question}", row["question"]).replace("{answer}", row["completion"])
        return encode_prompt(self.tokenizer, render_prompt(text, "chat", self.tokenizer, instruction_suffix=""))

    def verify_rows(self, rows: Sequence[dict[str, Any]]) -> list[Verdict]:
        """One verdict per row: accepted when the share of 'yes' judgements reaches the threshold."""
        prompts = [self._prompt_ids(row) for row in rows]
        judged = collect(self.engine.stream(prompts, self.sampling), len(prompts))
        verdicts = []
        for row, judgements in zip(rows, judged):
            score = sum(parse_verdict(j.text) is True for j in judgements) / len(judgements)
            note = "\n---\n".join(j.text for j in judgements)
            verdicts.append(Verdict(score >= self.threshold, extract_answer(row["completion"]), note=note))
        return verdicts


register_verifier(JudgeVerifier.name, JudgeVerifier)
