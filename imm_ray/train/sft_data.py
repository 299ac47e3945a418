"""SFT examples: read the JSONL, tokenize prompt + completion + eos, mask the prompt, collate.

Pure data code (torch, a tokenizer and the storage layer; no Ray) so it is unit-testable on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from imm_ray.data.prompts import encode_prompt
from imm_ray.storage import Location, StorageError, parse_jsonl, read_text, resolve
from imm_ray.train.settings import SFTError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTRow:
    """One training pair: a fully rendered prompt and the model's response text."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class TokenizedExample:
    """Ids of prompt + completion + eos, truncated; the first `prompt_len` positions are masked."""

    input_ids: list[int]
    prompt_len: int

    @property
    def labels(self) -> list[int]:
        """Targets aligned with `input_ids`: IGNORE_INDEX on the prompt, the token id elsewhere."""
        n = min(self.prompt_len, len(self.input_ids))
        return [IGNORE_INDEX] * n + self.input_ids[n:]


def read_rows(path: str | Path | Location) -> list[SFTRow]:
    """Read a JSONL file (a local path or a URI) of {"prompt": str, "completion": str} rows;
    blank lines are skipped.

    Raises SFTError when the file is missing or a row is malformed (the message names the line).
    """
    loc = resolve(path)
    try:
        text = read_text(loc)
    except FileNotFoundError:
        raise SFTError(f"SFT data file not found: {loc}") from None
    try:
        records = parse_jsonl(text, str(loc))
    except StorageError as exc:  # a malformed line
        raise SFTError(str(exc)) from None
    rows: list[SFTRow] = []
    for line_no, record in enumerate(records, start=1):
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise SFTError(f"{loc}: row {line_no} needs string fields 'prompt' and 'completion'")
        rows.append(SFTRow(prompt, completion))
    return rows


def tokenize_row(tokenizer: PreTrainedTokenizerBase, row: SFTRow,
                 max_length: int) -> TokenizedExample | None:
    """Tokenize prompt and completion separately, append eos once, truncate to `max_length`.

    The prompt goes through `encode_prompt`, exactly as the generation engines tokenize it.

    Returns None when the prompt alone fills `max_length` (no completion token would remain).
    """
    eos_token, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_token is None or eos_id is None:
        raise SFTError("the tokenizer has no eos token; SFT needs one to end completions")
    prompt_ids = encode_prompt(tokenizer, row.prompt)
    if len(prompt_ids) >= max_length:
        return None
    completion = row.completion
    if completion.endswith(eos_token):
        completion = completion[: -len(eos_token)]
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids or completion_ids[-1] != eos_id:
        completion_ids.append(eos_id)
    return TokenizedExample((prompt_ids + completion_ids)[:max_length], len(prompt_ids))


def tokenize_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[SFTRow],
                  max_length: int) -> tuple[list[TokenizedExample], int]:
    """Tokenize every row; returns the kept examples and how many were dropped (prompt too long)."""
    examples: list[TokenizedExample] = []
    for row in rows:
        example = tokenize_row(tokenizer, row, max_length)
        if example is not None:
            examples.append(example)
    return examples, len(rows) - len(examples)


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), attention_mask and labels (0 / -100 on padding)."""
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise SFTError("the tokenizer has neither a pad nor an eos token")
    return int(pad_id)
