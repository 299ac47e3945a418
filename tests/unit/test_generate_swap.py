"""The CPU weight swap's re-pack, on vLLM's own CPU GEMM dispatch (no engine).

A tied LM head shares the embedding's weight: the reload updates that tensor, but the head's packed
kernel keeps the old values until it is dispatched again."""

from __future__ import annotations

import pytest
import torch

from imm_ray.generate.vllm_swap import repack_cpu_gemms

utils = pytest.importorskip("vllm.model_executor.layers.utils")


class Head(torch.nn.Module):
    """A layer as vLLM's CPU path leaves it: ``cpu_linear`` set by the dispatch."""

    def __init__(self, weight: torch.Tensor, remove_weight: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        utils.dispatch_cpu_unquantized_gemm(self, remove_weight=remove_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, None)


def test_repack_gives_a_head_whose_weight_changed_in_place_its_new_weights():
    torch.manual_seed(0)
    old, new = torch.randn(640, 128, dtype=torch.bfloat16), torch.randn(640, 128, dtype=torch.bfloat16)
    model = torch.nn.Module()
    model.head = Head(old.clone(), remove_weight=False)  # embeddings and LM heads keep their weight
    model.proj = Head(torch.randn(256, 128, dtype=torch.bfloat16), remove_weight=True)  # packed copy only
    model.norm = torch.nn.LayerNorm(128)  # no GEMM
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    proj_before = model.proj(x)

    with torch.no_grad():
        model.head.weight.copy_(new)  # what reload_weights does to a tied head's weight
    stale = model.head(x)
    # The fault: where the dispatch packs weights (AVX-512 / AMX CPUs) the head still computes with the
    # old ones; a CPU whose dispatch reads the weight tensor itself (AVX2) has no fault to repair.
    if not torch.allclose(stale.float(), (x @ new.T).float(), rtol=2e-2, atol=2e-2):
        assert torch.allclose(stale.float(), (x @ old.T).float(), rtol=2e-2, atol=2e-2)

    # A weightless (packed-only) layer is skipped; where the dispatch packs nothing (AVX2) every layer
    # keeps its weight and is re-dispatched, which changes nothing.
    weightless = model.proj.weight.numel() == 0
    assert repack_cpu_gemms(model) == (["head"] if weightless else ["head", "proj"])
    torch.testing.assert_close(model.head(x).float(), (x @ new.T).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model.proj(x), proj_before)  # a weightless layer is left as it was
