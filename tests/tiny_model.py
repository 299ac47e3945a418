"""A tiny chat model for tests, built locally in seconds (never downloaded).

`build_tiny_model` trains a BPE tokenizer on a handful of trivial arithmetic problems, creates a
2-layer Llama with tied embeddings and teaches it to memorize the chat-formatted solutions, so
that greedy decoding reproduces "... The answer is N." followed by ``<|im_end|>``. The folder it
writes (safetensors, tokenizer with a ChatML chat template, generation config) loads in
transformers and in vLLM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# (question, solution ending "The answer is N.", gold answer N)
TINY_PROBLEMS: list[tuple[str, str, str]] = [
    ("What is 2 plus 3?", "2 plus 3 is 5. The answer is 5.", "5"),
    ("What is 7 minus 4?", "7 minus 4 is 3. The answer is 3.", "3"),
    ("What is 6 times 2?", "6 times 2 is 12. The answer is 12.", "12"),
    ("What is 9 plus 8?", "9 plus 8 is 17. The answer is 17.", "17"),
    ("What is 15 minus 6?", "15 minus 6 is 9. The answer is 9.", "9"),
    ("What is 4 times 5?", "4 times 5 is 20. The answer is 20.", "20"),
    ("Tom has 3 apples and buys 4 more. How many apples does he have?",
     "Tom has 3 apples. He buys 4 more, so 3 plus 4 is 7. The answer is 7.", "7"),
    ("A box holds 10 pens. Sam takes 2 pens. How many pens are left?",
     "The box holds 10 pens. Sam takes 2, so 10 minus 2 is 8. The answer is 8.", "8"),
]

_EXTRA_TEXT = [
    " ".join(str(i) for i in range(201)),
    "plus minus times divided by equals is the answer What How many much does do has have left "
    "more less each total first then so and of in a an to from takes gives buys sells",
    "apples pens books cars cookies eggs dollars friends boxes bags hours days",
    "You are a helpful assistant. Solve the math problem step by step.",
    "system user assistant Question Answer Let's think step by step.",
]

MIN_GREEDY_CORRECT = 6


def build_tiny_tokenizer(out_dir: str | Path | None = None,
                         vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the tiny problems; save it to `out_dir` if given."""
    corpus: list[str] = list(_EXTRA_TEXT)
    for question, solution, _ in TINY_PROBLEMS:
        corpus += [question, solution, f"user\n{question}", f"assistant\n{solution}"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _prompt_ids(tokenizer: PreTrainedTokenizerFast, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _training_batch(tokenizer: PreTrainedTokenizerFast
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (loss on solution + <|im_end|> only)."""
    rows: list[tuple[list[int], list[int]]] = []
    for question, solution, _ in TINY_PROBLEMS:
        prompt = _prompt_ids(tokenizer, question)
        target = tokenizer(solution + IM_END, add_special_tokens=False)["input_ids"]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return input_ids, mask, labels


def greedy_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                   max_new_tokens: int = 48) -> list[str]:
    """Greedy completions (special tokens stripped) for every tiny problem, in one batch."""
    prompts = [_prompt_ids(tokenizer, question) for question, _, _ in TINY_PROBLEMS]
    width = max(len(ids) for ids in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def count_correct(completions: Sequence[str]) -> int:
    """How many completions contain the memorized solution of their problem."""
    return sum(solution in text for text, (_, solution, _) in zip(completions, TINY_PROBLEMS))


def build_tiny_model(out_dir: str | Path, memorize_steps: int = 300, seed: int = 0) -> Path:
    """Build, train (memorize TINY_PROBLEMS) and save the tiny model into `out_dir`.

    Raises RuntimeError when greedy decoding reproduces fewer than 6 of the 8 solutions.
    Runs single-threaded: the tensors are tiny, and torch's thread pool slows down many-fold
    when other processes (a vLLM engine, Ray workers) busy the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_tiny_model(Path(out_dir), memorize_steps, seed)
    finally:
        torch.set_num_threads(threads)


def _build_tiny_model(out_dir: Path, memorize_steps: int, seed: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=im_end,
    )
    model = LlamaForCausalLM(config)
    input_ids, mask, labels = _training_batch(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(memorize_steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logger.info("tiny model: final memorization loss %.4f after %d steps",
                loss.item(), memorize_steps)

    correct = count_correct(greedy_answers(model, tokenizer))
    if correct < MIN_GREEDY_CORRECT:
        raise RuntimeError(f"tiny model memorized only {correct}/{len(TINY_PROBLEMS)} problems "
                           f"(loss {loss.item():.4f}); raise memorize_steps")
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=im_end)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def write_tiny_dataset(path: str | Path,
                       split_problems: Sequence[tuple[str, str, str]]) -> Path:
    """Write problems as GSM8K-format JSONL: {"question": q, "answer": "<solution>\\n#### N"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for question, solution, gold in split_problems:
            f.write(json.dumps({"question": question, "answer": f"{solution}\n#### {gold}"}) + "\n")
    return path


def _vllm_check(model_dir: Path) -> None:
    """Manual check: vLLM loads the tiny model and greedily reproduces the memorized solutions."""
    import os
    import time

    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                       "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, max_model_len=512)
    logger.info("vLLM engine up in %.1f s", time.perf_counter() - start)
    messages = [[{"role": "user", "content": q}] for q, _, _ in TINY_PROBLEMS]
    outputs = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=48))
    texts = [out.outputs[0].text for out in outputs]
    for text in texts:
        logger.info("vLLM greedy: %r", text)
    logger.info("vLLM greedy correct: %d/%d", count_correct(texts), len(TINY_PROBLEMS))


if __name__ == "__main__":
    import argparse
    import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Build the tiny test model into a folder.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vllm", action="store_true", help="then load it in vLLM and generate")
    args = parser.parse_args()
    t0 = time.perf_counter()
    build_tiny_model(args.out_dir)
    logger.info("built %s in %.1f s", args.out_dir, time.perf_counter() - t0)
    if args.vllm:
        _vllm_check(args.out_dir)
