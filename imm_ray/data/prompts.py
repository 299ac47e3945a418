"""Prompt templates: turn a question into the exact text (and token ids) a model sees.

Generation engines and SFT both go through render_prompt + encode_prompt, so training and
sampling see identical prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imm_ray.registry import Registry

__all__ = [
    "ALPACA_PROMPT",
    "DEFAULT_INSTRUCTION_SUFFIX",
    "PROMPT_TEMPLATES",
    "PromptTemplate",
    "default_stop_strings",
    "encode_prompt",
    "get_prompt_template",
    "register_prompt_template",
    "render_prompt",
]

DEFAULT_INSTRUCTION_SUFFIX = (
    "\nSolve step by step and end your answer with: The answer is <number>."
)

# The authors' prompt (merge_syn scripts), used verbatim.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Response: Let's think step by step."
)

# render(question, tokenizer, system_prompt, instruction_suffix) -> prompt text
RenderFn = Callable[[str, Any, "str | None", "str | None"], str]


@dataclass(frozen=True)
class PromptTemplate:
    """A named way to render a question, with the stop strings that end its responses."""

    name: str
    render: RenderFn
    stop_strings: tuple[str, ...] = ()


PROMPT_TEMPLATES: Registry[PromptTemplate] = Registry("prompt template")


def register_prompt_template(template: PromptTemplate, overwrite: bool = False) -> PromptTemplate:
    """Add a template to PROMPT_TEMPLATES (ValueError if the name exists and overwrite is False)."""
    return PROMPT_TEMPLATES.add(template.name, template, overwrite)


def get_prompt_template(name: str) -> PromptTemplate:
    """The template called name; KeyError listing the known ones otherwise."""
    return PROMPT_TEMPLATES.lookup(name)


def _render_chat(
    question: str, tokenizer: Any, system_prompt: str | None, instruction_suffix: str | None
) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt template 'chat' needs a tokenizer with a chat_template; "
            "use template 'alpaca' for base models without one"
        )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question + (instruction_suffix or "")})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _render_alpaca(
    question: str, tokenizer: Any, system_prompt: str | None, instruction_suffix: str | None
) -> str:
    # The paper's prompt is fixed: it has no system slot and already asks for step-by-step work.
    return ALPACA_PROMPT.format(question=question)


register_prompt_template(PromptTemplate("chat", _render_chat, ()))
register_prompt_template(
    PromptTemplate("alpaca", _render_alpaca, ("### Instruction", "Question:"))
)


def render_prompt(
    question: str,
    template: str,
    tokenizer: Any,
    system_prompt: str | None = None,
    instruction_suffix: str | None = DEFAULT_INSTRUCTION_SUFFIX,
) -> str:
    """Prompt text for question under the named template.

    "chat": the tokenizer's chat template over [system?, user(question + instruction_suffix)]
    with the generation prompt appended. "alpaca": the paper's fixed Alpaca prompt (system_prompt
    and instruction_suffix do not apply).
    """
    return get_prompt_template(template).render(question, tokenizer, system_prompt, instruction_suffix)


def default_stop_strings(template: str) -> list[str]:
    """Stop strings that end a response under the named template (a fresh list)."""
    return list(get_prompt_template(template).stop_strings)


def _adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer has a BOS token and puts it first when adding special tokens."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt, without the tokenizer adding special tokens itself.

    If the tokenizer normally prepends BOS and the text does not already start with it (an
    Alpaca prompt; chat templates that need BOS write it into the text), BOS is prepended once.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer) and not (ids and ids[0] == tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    return ids
