"""Step plans, packing and the packed layout's loss: packed and padded micro-batches give the
loss and gradients of training on every example alone (tiny model, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from imm_ray.train.batches import (
    collate_packed,
    micro_batches,
    pack_rows,
    plan_epoch,
    steps_per_epoch,
)
from imm_ray.train.loop import batch_loss_sum
from imm_ray.train.sft_data import IGNORE_INDEX, SFTRow, TokenizedExample, tokenize_rows


def test_plan_covers_every_example_once_per_epoch():
    plan = plan_epoch(10, per_step=4, world_size=1, seed=3, epoch=0)
    assert [len(s) for s in plan.steps] == [4, 4, 2]
    assert sorted(i for s in plan.steps for i in s) == list(range(10))
    assert len(plan.steps) == steps_per_epoch(10, 4, 1)
    assert plan == plan_epoch(10, 4, 1, seed=3, epoch=0)
    assert plan != plan_epoch(10, 4, 1, seed=3, epoch=1)


def test_plan_shards_steps_over_workers_without_empty_shares():
    plan = plan_epoch(7, per_step=4, world_size=2, seed=0, epoch=0)
    assert len(plan.steps) == steps_per_epoch(7, 4, 2) == 2
    shares = [plan.for_rank(r, 2) for r in (0, 1)]
    assert all(len(step) > 0 for share in shares for step in share)
    seen = [i for share in shares for step in share for i in step]
    assert len(seen) == 8 and set(seen) == set(range(7))  # one example repeated, as DDP pads
    with pytest.raises(ValueError, match="steps of 3 over 2 workers"):
        plan_epoch(7, per_step=3, world_size=2, seed=0, epoch=0)


def test_pack_rows_first_fit_decreasing():
    examples = [TokenizedExample(list(range(n)), 1) for n in (3, 6, 2, 5, 4)]
    rows = pack_rows(examples, capacity=8)
    assert [[len(e.input_ids) for e in row] for row in rows] == [[6, 2], [5, 3], [4]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(examples, capacity=5)


def test_packed_micro_batches_group_rows_of_like_length():
    # Packing order gives rows of 6, 4 and 6 tokens ([6], [4], [3, 3]); in that order two rows to a
    # micro-batch would pad the 4 to 6. Longest first, the two full rows share one.
    examples = [TokenizedExample(list(range(n)), 1) for n in (6, 4, 3, 3)]
    batches = micro_batches(examples, 2, pad_id=0, packing=True)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 6), (1, 4)]
    assert sum(b["input_ids"].numel() for b in batches) == sum(len(e.input_ids) for e in examples)


def test_collate_packed_restarts_positions_and_masks_each_first_label():
    rows = [[TokenizedExample([4, 5, 6], 1), TokenizedExample([7, 8], 1)],
            [TokenizedExample([9, 10, 11, 12], 0)]]
    out = collate_packed(rows, pad_id=0)
    assert out["input_ids"].tolist() == [[4, 5, 6, 7, 8], [9, 10, 11, 12, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    x = IGNORE_INDEX
    # An empty prompt (prompt_len 0) still masks the first label: no token predicts it.
    assert out["labels"].tolist() == [[x, 5, 6, x, 8], [x, 10, 11, 12, x]]
    assert "attention_mask" not in out


@pytest.fixture(scope="module")
def examples(tiny_model_dir: Path) -> list[TokenizedExample]:
    """Chat examples of clearly different lengths."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for i, (a, b) in enumerate([(5, 4), (8, 3), (6, 7), (2, 9), (11, 5), (13, 4), (3, 3)]):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} plus {b}?"}],
                                               tokenize=False, add_generation_prompt=True)
        rows.append(SFTRow(prompt, f"{a} plus {b} is {a + b}." * (1 + 2 * (i % 3))))
    tokenized, dropped = tokenize_rows(tokenizer, rows, max_length=512)
    assert dropped == 0 and len({len(e.input_ids) for e in tokenized}) >= 3
    return tokenized


def loss_and_grads(model, batches, bf16=False) -> tuple[float, torch.Tensor]:
    """Summed loss over the micro-batches and the flattened gradient of that sum."""
    model.zero_grad()
    total = sum(batch_loss_sum(model, b, bf16) for b in batches)
    total.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total.item(), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_losses_equal_one_example_at_a_time(tiny_model_dir, examples, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attn)
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    alone = [micro_batches([ex], 1, pad, packing=False)[0] for ex in examples]
    padded = micro_batches(examples, 3, pad, packing=False)
    packed = micro_batches(examples, 2, pad, packing=True)
    longest = max(len(ex.input_ids) for ex in examples)
    assert sum(len(b["input_ids"]) for b in packed) < len(examples)  # fewer rows than examples
    assert max(b["input_ids"].shape[1] for b in packed) <= longest
    assert any((b["position_ids"] == 0).sum() > b["input_ids"].shape[0] for b in packed)  # packed
    assert sum(b["input_ids"].numel() for b in padded) > sum(len(e.input_ids) for e in examples)

    # Reference: transformers' own loss (mean over response tokens), one example at a time.
    with torch.no_grad():
        hf_loss = sum(model(input_ids=b["input_ids"], labels=b["labels"]).loss.item()
                      * int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in alone)
    ref_loss, ref_grads = loss_and_grads(model, alone)
    assert ref_loss == pytest.approx(hf_loss, rel=1e-5)
    for batches in (padded, packed):
        loss, grads = loss_and_grads(model, batches)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=2e-5)

    # The test can fail: the same row without the position restarts (one causal sequence) differs.
    leaky = {**packed[0], "position_ids": torch.arange(packed[0]["input_ids"].shape[1])[None]}
    assert loss_and_grads(model, [leaky])[0] != pytest.approx(ref_loss, rel=1e-3)


def test_packed_loss_under_bf16_autocast_close_to_fp32(tiny_model_dir, examples):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    packed = micro_batches(examples, 8, pad, packing=True)
    assert len(packed) == 1 and packed[0]["input_ids"].shape[0] > 1  # several rows, padded
    fp32, _ = loss_and_grads(model, packed)
    bf16, _ = loss_and_grads(model, packed, bf16=True)
    padded_bf16, _ = loss_and_grads(model, micro_batches(examples, 4, pad, packing=False),
                                    bf16=True)
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 == pytest.approx(padded_bf16, rel=2e-2)
