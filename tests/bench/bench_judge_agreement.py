"""How often the ``judge`` verifier agrees with gold: the model answers N GSM8K test questions (greedy),
the numeric verifier marks each answer against gold, and the judge (the same model by default, the
run's default) grades it without gold. Prints one JSON object: agreement, the judge's yes-rate, the
confusion counts and the judge's precision (of its yes, how many were right).

    python tests/bench/bench_judge_agreement.py [--questions 100] [--engine hf] [--max-tokens 256]
        [--judge-max-tokens 192] [--model embedded:smollm2-135m-instruct] [--judge MODEL]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from imm_ray.data import DatasetSpec, load_problems  # noqa: E402
from imm_ray.data.prompts import encode_prompt, render_prompt  # noqa: E402
from imm_ray.generate.engine import SamplingSpec, collect, create_engine  # noqa: E402
from imm_ray.generate.settings import EngineSettings  # noqa: E402
from imm_ray.models import resolve_model  # noqa: E402
from imm_ray.verify import JudgeVerifier, parse_verdict, verify_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--judge-max-tokens", type=int, default=192)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--judge", default=None, help="judge model (default: --model)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    problems = load_problems(DatasetSpec(name="gsm8k", preset="gsm8k", split="test", limit=args.questions)).problems
    settings = EngineSettings(name=args.engine, dtype="float32", batch_size=16)
    model = resolve_model(args.model, None)
    engine = create_engine(args.engine, model, settings)
    tok = engine.tokenizer if hasattr(engine, "tokenizer") else None
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    prompts = [encode_prompt(tok, render_prompt(p.question, "chat", tok)) for p in problems]
    t0 = time.perf_counter()
    answers = [c[0].text for c in collect(engine.stream(prompts, SamplingSpec(max_tokens=args.max_tokens, seed=None)),
                                          len(prompts))]
    engine.close()
    gold = [v.correct for v in verify_batch([(a, p.answer) for a, p in zip(answers, problems)], "numeric")]
    t1 = time.perf_counter()
    judge_model = resolve_model(args.judge, None) if args.judge else model
    judge = JudgeVerifier(judge_model, settings, max_tokens=args.judge_max_tokens)
    rows = [{"problem_id": p.id, "question": p.question, "completion": a} for p, a in zip(problems, answers)]
    verdicts = judge.verify_rows(rows)
    judge.close()
    said = [v.correct for v in verdicts]
    pairs = list(zip(said, gold))
    yes = sum(said)
    print(json.dumps({
        "questions": len(problems), "model": args.model, "judge": args.judge or args.model, "engine": args.engine,
        "answer_accuracy": sum(gold) / len(gold),
        "judge_agreement": sum(s == g for s, g in pairs) / len(pairs),
        "judge_yes_rate": yes / len(said),
        "judge_no_verdict": sum(parse_verdict(v.note or "") is None for v in verdicts),
        "judge_precision": sum(s and g for s, g in pairs) / yes if yes else None,
        "confusion": {f"{'yes' if s else 'no'}_{'right' if g else 'wrong'}": pairs.count((s, g))
                      for s in (True, False) for g in (True, False)},
        "seconds": {"answers": round(t1 - t0, 1), "judge": round(time.perf_counter() - t1, 1)},
    }))


if __name__ == "__main__":
    main()
