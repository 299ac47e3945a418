"""Faults and bad input against the serving core (issue 12, defects 1-8), each reproduced with a
fake engine: concurrent on-demand loads, broken or deleted rounds, a garbage state.json, what the
unauthenticated routes reveal, metric labels, OpenAI parameter defaults, prompt bounds, and the
engine lock of blocking engines."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import FakeBackend, FakeLoader, make_client, started, write_state

from imm_ray.serve.auth import KeyChecker
from imm_ray.serve.http_app import create_app

MSG = [{"role": "user", "content": "x"}]


class CountingLoader(FakeLoader):
    """Loads take a while (as engines do) and the number of open engines is tracked."""

    def __init__(self, delay: float = 0.02) -> None:
        super().__init__()
        self.delay, self.open, self.max_open, self.loads = delay, 0, 0, 0

    async def __call__(self, path: Path) -> FakeBackend:
        await asyncio.sleep(self.delay)
        b = await super().__call__(path)
        self.loads += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        close = b.close

        async def counted_close() -> None:
            self.open -= 1
            await close()

        b.close = counted_close
        return b


async def with_loader(tmp_path: Path, rounds: list[int], loader: FakeLoader, **kw):
    server, _, run = await started(tmp_path, rounds, **kw)
    await server.stop()
    from imm_ray.serve.server import OpenAIServer

    server = OpenAIServer(server.settings, run, loader=loader)
    await server.start()
    return server, run


# --- defect 1: concurrent requests for several non-resident rounds --------------------------
def test_concurrent_requests_for_many_non_resident_rounds_all_succeed(tmp_path):
    async def main():
        loader = CountingLoader()
        server, _ = await with_loader(tmp_path, list(range(1, 8)), loader, resident_models=2, spare_engines=0)
        client = make_client(create_app(server, KeyChecker(())))
        for _ in range(2):  # the second wave finds other rounds resident than the first left
            res = await asyncio.gather(*(client.chat.completions.create(model=f"run/round-{n}", messages=MSG)
                                         for n in range(0, 8)), return_exceptions=True)
            assert [getattr(r, "model", r) for r in res] == [f"run/round-{n}" for n in range(0, 8)]
        assert loader.max_open <= 2  # loads reuse the engine they evict: memory stays bounded
        await server.stop()

    asyncio.run(main())
