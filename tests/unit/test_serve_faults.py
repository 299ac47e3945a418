"""Faults and bad input against the serving core (issue 12, defects 1-8), each reproduced with a
fake engine: concurrent on-demand loads, broken or deleted rounds, a garbage state.json, what the
unauthenticated routes reveal, metric labels, OpenAI parameter defaults, prompt bounds, and the
engine lock of blocking engines."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import FakeBackend, FakeLoader, make_client, started, wait_for, write_checkpoint, write_state

from imm_ray.serve.auth import KeyChecker
from imm_ray.serve.http_app import create_app
from imm_ray.serve.server import OpenAIServer
from imm_ray.serve.settings import LimitSettings, ServeSettings
from imm_ray.storage import publish_dir, write_json

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
    server = OpenAIServer(server.settings, run, loader=loader)
    await server.start()
    return server, run


@pytest.fixture
def with_spare(tmp_path):
    """``await with_spare(rounds, resident_models)``: a server over ``rounds`` whose CountingLoader
    (no load delay) has its one spare engine ready; returns the server, its run folder and the loader."""
    async def start(rounds: list[int], resident_models: int) -> tuple[OpenAIServer, Path, CountingLoader]:
        loader = CountingLoader(delay=0)
        server, run = await with_loader(tmp_path, rounds, loader, resident_models=resident_models, spare_engines=1)
        await wait_for(lambda: server.pool.spares == 1)
        return server, run, loader

    return start


def server_app(server):
    return create_app(server, KeyChecker(()))


def raw_client(app) -> httpx.AsyncClient:
    """Plain HTTP to ``app`` in this process (for status codes and bodies the OpenAI client hides)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


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


# --- defect 2: deleted, half-written and failing rounds ------------------------------------
def test_deleted_or_broken_rounds_answer_404_503_without_spending_an_engine(tmp_path, with_spare):
    async def main():
        server, run, loader = await with_spare([1, 2, 3, 4], resident_models=2)
        raw = raw_client(server_app(server))
        shutil.rmtree(run / "imm/round-001")
        (run / "imm/round-002/merged/config.json").unlink()
        st = run / "imm/round-003/merged/model.safetensors"
        st.write_bytes(st.read_bytes()[:-10])  # truncated
        (run / "base/model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2]          ")
        loads = loader.loads
        expected = {1: (404, "was removed"), 2: (503, "config.json is missing"), 3: (503, "truncated"),
                    0: (503, "model.safetensors")}
        for _ in range(3):  # retries are answered from memory: no engine is taken or started
            for n, (status, words) in expected.items():
                r = await raw.post("/v1/chat/completions", json={"model": f"run/round-{n}", "messages": MSG})
                err = r.json()["error"]
                assert (r.status_code, words in err["message"]) == (status, True), err
                assert str(tmp_path) not in err["message"] and f"run/round-{n}" in err["message"]
        assert loader.loads == loads and server.pool.spares == 1 and loader.open == 2
        ok = await make_client(server_app(server)).chat.completions.create(model="run/latest", messages=MSG)
        assert ok.model == "run/round-4"
        # repaired: served again (the verdict was tied to the folder's files)
        (run / "imm/round-002/merged/config.json").write_text("{}")
        ok = await make_client(server_app(server)).chat.completions.create(model="run/round-2", messages=MSG)
        assert ok.model == "run/round-2"
        await server.stop()

    asyncio.run(main())


def test_a_round_whose_engine_fails_to_load_is_not_retried_and_keeps_the_engine(tmp_path, with_spare):
    async def main():
        server, run, _ = await with_spare([1, 2], resident_models=1)
        spare = server.pool._spares[0]
        attempts = []

        async def failing_reload(path):
            attempts.append(path)
            raise RuntimeError(f"cannot load {path}")

        spare.reload = failing_reload
        client = make_client(server_app(server))
        for _ in range(3):
            with pytest.raises(openai.InternalServerError) as err:  # 503
                await client.chat.completions.create(model="run/round-1", messages=MSG)
            assert err.value.status_code == 503 and "failed to load (RuntimeError" in err.value.message
            assert str(tmp_path) not in err.value.message
        assert len(attempts) == 1 and server.pool.spares == 1 and not spare.closed
        assert (await client.chat.completions.create(model="run/latest", messages=MSG)).model == "run/round-2"
        await server.stop()

    asyncio.run(main())


def test_garbage_state_json_keeps_the_rounds_it_listed(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1, 2])
        client = make_client(server_app(server))
        raw = raw_client(server_app(server))
        for garbage in ("\x00garbage{", "[1, 2]", '{"stages": {"imm/round-003/evaluate": "done", "x": [1]}}'):
            server.follower.problem = None
            (run / "state.json").write_text(garbage)
            await wait_for(lambda: server.follower.problem is not None)  # the follower read it
            for model in ("run/round-1", "run/latest"):
                assert (await client.chat.completions.create(model=model, messages=MSG)).choices
            health = (await raw.get("/health")).json()
            assert health["status"] == "ok"
            assert "state.json" in health["warning"]
        write_state(run, [1, 2, 3])
        await wait_for(lambda: server.latest[0] == 3)
        assert "warning" not in (await raw.get("/health")).json()
        await server.stop()

    asyncio.run(main())


# --- defect 6: nothing internal in open routes or error text ---------------------------------
def test_health_and_generation_errors_reveal_no_paths(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1])
        raw = raw_client(server_app(server))
        health = (await raw.get("/health")).json()
        assert health["resident"] == ["run/round-1"] and str(tmp_path) not in json.dumps(health)

        async def broken_stream(params):
            raise RuntimeError(f"CUDA error in {run}/secret.py")
            yield  # pragma: no cover

        loader.backends[run / "imm/round-001/merged"].stream = broken_stream
        body = {"model": "run/latest", "messages": MSG}
        r = await raw.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
        assert str(run) not in r.text and "reference" in r.json()["error"]["message"]
        r = await raw.post("/v1/chat/completions", json={**body, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert "generation failed (RuntimeError)" in events[-1]["error"]["message"] and str(run) not in r.text
        await server.stop()

    asyncio.run(main())


# --- defect 3: metric labels are route templates ----------------------------------------------
def test_metrics_do_not_grow_with_the_paths_clients_send(tmp_path):
    async def main():
        server, _, _ = await started(tmp_path, [1])
        app = create_app(server, KeyChecker(("k",)))
        raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                headers={"Authorization": "Bearer k"})
        await raw.get("/v1/models/run/round-1")
        before = len((await raw.get("/metrics")).content)
        for i in range(300):
            await raw.get(f"/random-{i}/{'x' * 50}")  # unknown paths
            await raw.get(f"/v1/models/run/round-{i}")  # one route, many model ids
            await raw.get(f"/nope-{i}", headers={"Authorization": "Bearer wrong"})  # unauthenticated
        text = (await raw.get("/metrics")).text
        assert len(text) < before + 3000, len(text)
        assert 'route="unmatched"' in text and 'route="/v1/models/{model_id:path}"' in text
        assert "random-" not in text and "round-7" not in text
        await server.stop()

    asyncio.run(main())


# --- defect 7: OpenAI parameters -----------------------------------------------------------
def test_openai_defaults_are_accepted_and_unsupported_values_refused(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1])
        raw = raw_client(server_app(server))
        chat = {"model": "run/latest", "messages": MSG}
        defaults = {"logprobs": None, "top_logprobs": None, "frequency_penalty": 0, "presence_penalty": 0.0,
                    "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                    "n": 1, "stream": False, "user": "u1", "store": False, "parallel_tool_calls": True,
                    "seed": 5, "temperature": 0, "max_tokens": None, "safety_identifier": "x", "metadata": None}
        r = await raw.post("/v1/chat/completions", json={**chat, **defaults})
        assert r.status_code == 200, r.text
        for name, value in [("logprobs", True), ("logprobs", 0), ("top_logprobs", 3), ("frequency_penalty", 0.5),
                            ("tools", [{"type": "function", "function": {"name": "f"}}]),
                            ("response_format", {"type": "json_object"}), ("seed", 5)]:
            r = await raw.post("/v1/chat/completions", json={**chat, name: value, "temperature": 0.7})
            err = r.json()["error"]
            assert (r.status_code, err["code"], err["param"]) == (400, "unsupported_parameter", name), (name, err)
        comp = {"model": "run/latest", "prompt": "2+2="}
        for name, value in [("logprobs", 0), ("best_of", 2), ("suffix", "x")]:
            r = await raw.post("/v1/completions", json={**comp, name: value})
            assert (r.status_code, r.json()["error"]["param"]) == (400, name)
        assert (await raw.post("/v1/completions", json={**comp, "best_of": 1, "suffix": None,
                                                        "logprobs": None})).status_code == 200
        # seed reaches engines that honour it; echo repeats the prompt (plain and streamed)
        backend = loader.backends[run / "imm/round-001/merged"]
        backend.supports_seed = True
        assert (await raw.post("/v1/completions", json={**comp, "seed": 7, "temperature": 0.7})).status_code == 200
        assert backend.last_params.seed == 7
        client = make_client(server_app(server))
        out = await client.completions.create(model="run/latest", prompt="2+2=", echo=True, n=2)
        assert [c.text for c in out.choices] == ["2+2=round-001 says hi"] * 2
        stream = await client.completions.create(model="run/latest", prompt="2+2=", echo=True, stream=True)
        assert "".join([c.choices[0].text async for c in stream]) == "2+2=round-001 says hi"
        await server.stop()

    asyncio.run(main())


# --- defect 4: prompts are bounded before tokenizing, and tokenized off the event loop ---------
def test_big_prompts_are_refused_untokenized_and_tokenizing_never_blocks_the_loop(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1])  # max_prompt_tokens=200
        raw = raw_client(server_app(server))
        tok = loader.backends[run / "imm/round-001/merged"].tokenizer
        calls, events, done = [], [], threading.Event()
        plain = type(tok).__call__

        def slow_call(text, add_special_tokens=False):
            calls.append(len(text))
            done.wait(timeout=30)  # a tokenizer busy with a long text, until /health was answered
            events.append("tokenized")
            return plain(tok, text, add_special_tokens)

        tok.__class__ = type("SlowTokenizer", (type(tok),), {"__call__": lambda self, *a, **k: slow_call(*a, **k)})
        r = await raw.post("/v1/completions", json={"model": "run/latest", "prompt": "x" * 500_000})
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"] and calls == []
        slow = asyncio.ensure_future(raw.post("/v1/completions", json={"model": "run/latest", "prompt": "y" * 150}))
        await wait_for(lambda: calls == [150])
        assert (await raw.get("/health")).status_code == 200
        events.append("health")
        done.set()
        assert (await slow).status_code == 200
        assert events == ["health", "tokenized"]  # answered while the tokenizer worked
        await server.stop()

    asyncio.run(main())


# --- defect 5: a cancelled request keeps a blocking engine locked until its generation ended ---
def test_cancelled_request_on_a_blocking_engine_never_overlaps_the_next(tmp_path):
    from imm_ray.generate.engine import Completion
    from imm_ray.serve.backends import EngineBackend
    from imm_ray.serve.protocol import GenParams

    class BlockingEngine:
        def __init__(self) -> None:
            self.running = self.max_running = 0
            self.release = threading.Event()
            self.guard = threading.Lock()

        def generate(self, prompts, spec):
            with self.guard:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
            self.release.wait(5)
            with self.guard:
                self.running -= 1
            return [[Completion(text="ok", finish_reason="stop", num_tokens=1)]]

    async def main():
        engine = BlockingEngine()
        backend = EngineBackend(tmp_path, engine, tokenizer=None)
        params = GenParams([1, 2], 1, 0.0, 1.0, 4, ())

        async def run() -> str:
            return "".join([d.text async for d in backend.stream(params)])

        first = asyncio.ensure_future(run())
        await wait_for(lambda: engine.running == 1)
        first.cancel()  # the client went away while the engine generates
        second = asyncio.ensure_future(run())
        await asyncio.sleep(0.1)  # time for the second to overlap the first, were it free to
        assert engine.running == 1  # the second waits for the first's generation
        engine.release.set()
        assert await second == "ok" and engine.max_running == 1
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())


# --- fault matrix: an engine process dies ------------------------------------------------------
def test_a_dead_engine_fails_the_health_check_with_its_round(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1, 2], resident_models=2)
        await server.check_engines()
        loader.backends[run / "imm/round-002/merged"].dead = True
        with pytest.raises(RuntimeError, match=r"the engine of run/round-2 died \(RuntimeError\)"):
            await server.check_engines()
        await server.stop()

    asyncio.run(main())


def test_an_engine_dying_mid_stream_fails_only_its_own_streams(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1, 2], resident_models=3)
        client = make_client(server_app(server))
        await client.chat.completions.create(model="run/round-1", messages=MSG)  # resident
        dying = loader.backends[run / "imm/round-001/merged"]
        healthy = loader.backends[run / "imm/round-002/merged"]
        dying.gate.clear()
        healthy.gate.clear()

        async def read(model: str) -> str:
            stream = await client.chat.completions.create(model=model, messages=MSG, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        streams = [asyncio.ensure_future(read(m)) for m in ["run/round-1", "run/latest"] * 3]
        entries = [server.pool._entries[run / f"imm/round-00{n}/merged"] for n in (1, 2)]
        await wait_for(lambda: [e.leases for e in entries] == [3, 3])  # every stream is at its gate
        dying.closed = True  # its engine died: the next step of each of its generations fails
        dying.gate.set()
        healthy.gate.set()
        results = await asyncio.gather(*streams, return_exceptions=True)
        assert results[1::2] == ["round-002 says hi"] * 3
        assert all(isinstance(r, openai.APIError) and "generation failed" in str(r) for r in results[0::2]), results
        assert server.pool._entries[run / "imm/round-001/merged"].leases == 0  # leases released
        await server.stop()

    asyncio.run(main())


# --- load: many clients over resident and on-demand rounds -------------------------------------
def test_load_many_clients_across_rounds_no_failures_and_bounded_engines(tmp_path):
    async def main():
        loader = CountingLoader(delay=0.01)
        server, _ = await with_loader(tmp_path, [1, 2, 3, 4, 5], loader, resident_models=2, spare_engines=1)
        client = make_client(server_app(server))
        models = [f"run/round-{n}" for n in range(6)] + ["run/latest"]

        async def one(i: int) -> str:
            model = models[i % len(models)]
            if i % 2:
                stream = await client.chat.completions.create(model=model, messages=MSG, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return (await client.chat.completions.create(model=model, messages=MSG)).choices[0].message.content

        texts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(210))), timeout=60)
        names = ["run"] + [f"round-00{n}" for n in range(1, 6)] + ["round-005"]
        assert texts == [f"{names[i % 7]} says hi" for i in range(210)]
        assert loader.max_open <= 3  # resident_models + spare_engines, whatever the load
        assert not server.pool._waiting and all(e.leases == 0 for e in server.pool._entries.values())
        await server.stop()

    asyncio.run(main())


# --- a run directory on object storage (S3 on loopback) ------------------------------------
def test_rounds_of_a_run_on_object_storage_are_materialized_and_served(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("IMM_NODE_CACHE_DIR", str(tmp_path / "cache"))
    run = f"{s3_bucket}/runs/s3run"
    src = write_checkpoint(tmp_path / "ckpt")

    def publish(rounds: list[int]) -> None:
        """state.json lists ``rounds`` (round 1 by a relative path, the others by URI)."""
        stages = {f"imm/round-{n:03d}/evaluate": {"status": "done", "info": {
            "model": f"imm/round-{n:03d}/merged" if n == 1 else f"{run}/imm/round-{n:03d}/merged"}} for n in rounds}
        write_json(f"{run}/state.json", {"stages": stages})

    async def main():
        publish_dir(src, f"{run}/imm/round-001/merged")
        publish([1])
        loader = FakeLoader()
        s = ServeSettings(poll_interval_s=0.05, resident_models=2, spare_engines=0, max_model_len=256,
                          limits=LimitSettings(max_tokens=16, max_prompt_tokens=200))
        server = OpenAIServer(s, run, loader=loader)
        await server.start()
        client = make_client(server_app(server))
        assert [m.id async for m in client.models.list()] == ["s3run/round-1", "s3run/latest"]
        assert (await client.chat.completions.create(model="s3run/latest", messages=MSG)).model == "s3run/round-1"
        [local] = loader.backends
        assert local.is_relative_to(tmp_path / "cache") and (local / "config.json").is_file()
        publish_dir(src, f"{run}/imm/round-003/merged")
        publish([1, 2, 3])  # round 2's upload never finished (nothing there)
        await wait_for(lambda: server.latest[0] == 3)
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="s3run/round-2", messages=MSG)
        assert err.value.status_code == 503 and s3_bucket not in err.value.message
        assert (await client.chat.completions.create(model="s3run/latest", messages=MSG)).model == "s3run/round-3"
        await server.stop()

    asyncio.run(main())
