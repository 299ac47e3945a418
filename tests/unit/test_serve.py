"""The serving core without Ray or a real engine: run-dir catalog, auth, validation, LRU + hot
swap, and the HTTP app driven by the official openai client over an in-process ASGI transport."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from imm_ray.errors import UserError
from imm_ray.serve.auth import KeyChecker, load_api_keys
from imm_ray.serve.backends import Delta
from imm_ray.serve.catalog import UnknownModelError, read_catalog
from imm_ray.serve.cli import add_serve_arguments, settings_from_cli
from imm_ray.serve.deploy import deployment_options, settings_from_args
from imm_ray.serve.http_app import create_app
from imm_ray.serve.pool import ModelPool
from imm_ray.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_request
from imm_ray.serve.server import OpenAIServer
from imm_ray.serve.settings import LimitSettings, ServeSettings


def write_checkpoint(folder: Path) -> Path:
    """A small but complete checkpoint folder (config + one safetensors file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "fake"}')
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def write_state(run: Path, rounds: list[int], arm: str = "imm", baseline: bool = True) -> None:
    stages = {}
    if baseline:
        stages["baseline/evaluate"] = {"status": "done", "info": {"model": str(write_checkpoint(run / "base"))}}
    for n in rounds:
        folder = write_checkpoint(run / arm / f"round-{n:03d}" / "merged")
        stages[f"{arm}/round-{n:03d}/evaluate"] = {"status": "done", "info": {"model": str(folder)}}
    stages[f"{arm}/round-{max(rounds, default=0) + 1:03d}/evaluate"] = {"status": "started"}
    (run / "state.json").write_text(json.dumps({"stages": stages}))


# --- catalog ---------------------------------------------------------------------------------
def test_catalog_maps_rounds_and_latest(tmp_path):
    run = tmp_path / "myrun"
    run.mkdir()
    assert read_catalog(run).ids() == []
    write_state(run, [1, 2])
    (run / "state.json").write_text((run / "state.json").read_text().replace('"imm/round-002', '"si/round-002', 0))
    cat = read_catalog(run)
    assert cat.ids() == ["myrun/round-0", "myrun/round-1", "myrun/round-2", "myrun/latest"]
    assert cat.resolve("myrun/latest") == (2, run / "imm/round-002/merged")
    assert cat.resolve("myrun/round-1")[0] == 1
    for bad in ("myrun/round-3", "other/round-1", "myrun/round-x", "latest"):
        with pytest.raises(UnknownModelError, match="available models: myrun/round-0"):
            cat.resolve(bad)
    assert read_catalog(run, arm="si").ids() == ["myrun/round-0", "myrun/latest"]


# --- auth ------------------------------------------------------------------------------------
def test_api_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("k-file  # ops\n\n")
    keys = load_api_keys(f, env={"IMM_API_KEYS": "a, b,,"})
    assert keys == ("a", "b", "k-file")
    chk = KeyChecker(keys)
    assert chk.check("Bearer b") and chk.check("bearer k-file")
    assert not any(chk.check(h) for h in (None, "", "Bearer", "Bearer c", "Basic a", "b"))
    assert KeyChecker(()).check(None)
    with pytest.raises(FileNotFoundError, match="api_keys_file"):
        load_api_keys(tmp_path / "missing", env={})


# --- validation ------------------------------------------------------------------------------
LIMITS = LimitSettings(max_body_bytes=2048, max_tokens=64, max_n=2)


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1]", 400, "invalid_json"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}', 400, "unknown_parameter"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "invalid_value"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}', 400, "invalid_value"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, "invalid_value"),
    (b'{"model": "m", "messages": []}', 400, "invalid_value"),
    (b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', 400, "invalid_value"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 3000 + b'"}]}', 413, "request_too_large"),
])
def test_invalid_requests_are_4xx(body, status, code):
    with pytest.raises(APIError) as exc:
        parse_request(ChatRequest, body, LIMITS)
    assert (exc.value.status, exc.value.code) == (status, code)
    assert set(exc.value.body()["error"]) == {"message", "type", "param", "code"}


def test_valid_requests_parse():
    body = b'{"model": "m", "prompt": ["2+2="], "stop": "\\n", "max_tokens": 8}'
    req = parse_request(CompletionRequest, body, LIMITS)
    assert req.prompt == "2+2=" and req.stop == ["\n"]


def test_settings_from_builder_args_and_deployment_options():
    s, run_dir = settings_from_args({"run_dir": "runs/x", "port": "9000", "autoscaling.enabled": "true",
                                     "autoscaling.max_replicas": "3", "limits.max_tokens": "32"})
    assert (run_dir, s.port, s.host, s.limits.max_tokens) == ("runs/x", 9000, "127.0.0.1", 32)
    opts = deployment_options(s)
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert opts["backpressure_config"]["status_code"] == 429
    assert deployment_options(ServeSettings(num_replicas=2))["num_replicas"] == 2
    with pytest.raises(UserError, match="run_dir"):
        settings_from_args({"port": "1"})
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--run-dir", "runs/d", "--port", "8123", "resident_models=3", "limits.max_tokens=9"])
    s, run_dir = settings_from_cli(args)
    assert (run_dir, s.port, s.resident_models, s.limits.max_tokens, s.engine.name) == ("runs/d", 8123, 3, 9, "vllm")
    with pytest.raises(UserError, match="unknown serve setting 'resident_model' .did you mean 'resident_models'"):
        settings_from_args({"run_dir": "x", "resident_model": "1"})
    with pytest.raises(UserError, match="'limits.max_tokn' .did you mean 'limits.max_tokens'"):
        settings_from_args({"run_dir": "x", "limits.max_tokn": "1"})
    with pytest.raises(UserError, match="serve setting port: Input should be less than or equal to 65535"):
        settings_from_args({"run_dir": "x", "port": "70000"})
    with pytest.raises(UserError, match="cannot read the serve config"):
        settings_from_args({"run_dir": "x", "config": "/no/such.yaml"})


# --- a fake engine ---------------------------------------------------------------------------
class FakeTokenizer:
    chat_template = "fake"
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeBackend:
    """Answers "<folder name> says hi" in three deltas; ``gate`` holds generation."""

    supports_seed = False

    def __init__(self, path: Path) -> None:
        self.path, self.tokenizer, self.closed = path, FakeTokenizer(), False
        self.gate = asyncio.Event()
        self.gate.set()

    async def stream(self, params):
        self.last_params = params
        words = [self.path.parent.name, " says", " hi"]
        for i in range(params.n):
            for j, w in enumerate(words):
                await self.gate.wait()
                assert not self.closed, "generation on a closed backend"
                last = j == len(words) - 1
                yield Delta(i, w, ("length" if params.max_tokens < 3 else "stop") if last else None, 1)

    async def reload(self, path: Path) -> "FakeBackend":
        self.path, self.reloads = path, getattr(self, "reloads", 0) + 1
        return self

    async def check(self) -> None:
        if getattr(self, "dead", False):
            raise RuntimeError("EngineCore died")

    async def close(self) -> None:
        self.closed = True


class FakeLoader:
    def __init__(self) -> None:
        self.backends: dict[Path, FakeBackend] = {}
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, path: Path) -> FakeBackend:
        await self.release.wait()
        b = self.backends[path] = FakeBackend(path)
        return b


def test_pool_lru_keeps_leased_backends_until_released():
    async def main():
        loader = FakeLoader()
        pool = ModelPool(loader, lambda b: b.close(), capacity=1)
        a, b = Path("/a/x"), Path("/b/x")
        async with pool.lease(a) as ba:
            await pool.ensure(b)  # a is evicted but still in use
            assert pool.resident() == [b] and not ba.closed
        await asyncio.sleep(0)
        assert ba.closed
        await pool.close_all()
        assert loader.backends[b].closed

    asyncio.run(main())


# --- the HTTP app with the openai client --------------------------------------------------------
def make_client(app, key: str = "none") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, http_client=http, max_retries=0)


async def wait_for(cond, timeout: float = 60.0) -> None:
    """Return once ``cond()`` holds (polled every 20 ms); fail after ``timeout`` seconds, a bound
    far above any wait on a loaded machine: it catches a hang, never a slow step."""
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def started(tmp_path: Path, rounds: list[int], **kw) -> tuple[OpenAIServer, FakeLoader, Path]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    write_state(run, rounds)
    loader = FakeLoader()
    kw = {"resident_models": 2, "spare_engines": 0, **kw}
    s = ServeSettings(poll_interval_s=0.05, limits=LimitSettings(max_tokens=16, max_prompt_tokens=200),
                      max_model_len=256, **kw)
    server = OpenAIServer(s, run, loader=loader)
    await server.start()
    return server, loader, run


def test_openai_client_models_completion_chat_stream_and_errors(tmp_path):
    async def main():
        server, _, _ = await started(tmp_path, [1, 2])
        client = make_client(create_app(server, KeyChecker(())))
        ids = [m.id async for m in client.models.list()]
        assert ids == ["run/round-0", "run/round-1", "run/round-2", "run/latest"]

        chat = await client.chat.completions.create(model="run/latest", messages=[{"role": "user", "content": "hi"}])
        assert chat.model == "run/round-2" and chat.choices[0].message.content == "round-002 says hi"
        assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens == 3

        comp = await client.completions.create(model="run/round-1", prompt="2+2=", max_tokens=2, n=2)
        assert [c.text for c in comp.choices] == ["round-001 says hi"] * 2
        assert comp.choices[0].finish_reason == "length"

        stream = await client.chat.completions.create(model="run/round-0", messages=[{"role": "user", "content": "x"}],
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "run says hi"
        assert chunks[-1].usage.completion_tokens == 3

        cstream = await client.completions.create(model="run/latest", prompt="q", stream=True)
        assert "".join([c.choices[0].text async for c in cstream]) == "round-002 says hi"

        with pytest.raises(openai.NotFoundError) as nf:
            await client.chat.completions.create(model="run/round-9", messages=[{"role": "user", "content": "x"}])
        assert "run/round-2" in nf.value.message and nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError, match="unknown parameter"):
            await client.chat.completions.create(model="run/latest", messages=[{"role": "user", "content": "x"}],
                                                 extra_body={"frobnicate": 1})
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            await client.chat.completions.create(model="run/latest", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=10_000)
        with pytest.raises(openai.BadRequestError, match="prompt has"):
            await client.completions.create(model="run/latest", prompt="x" * 300)

        raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server, KeyChecker(()))),
                                base_url="http://t")
        r = await raw.post("/v1/chat/completions", content=b"{oops")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await raw.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = await raw.get("/metrics")
        assert r.status_code == 200 and b"imm_serve_requests_total" in r.content
        await server.stop()

    asyncio.run(main())


def test_api_keys_required_except_health(tmp_path):
    async def main():
        server, _, _ = await started(tmp_path, [1])
        app = create_app(server, KeyChecker(("s3cret",)))
        with pytest.raises(openai.AuthenticationError):
            await make_client(app, "wrong").models.list()
        assert [m.id async for m in make_client(app, "s3cret").models.list()][-1] == "run/latest"
        raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        assert (await raw.get("/health")).json()["latest"] == "run/round-1"
        assert (await raw.get("/metrics")).status_code == 401
        await server.stop()

    asyncio.run(main())


def test_latest_moves_only_once_loaded_and_in_flight_finish_on_old(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1], resident_models=1)
        client = make_client(create_app(server, KeyChecker(())))
        old = loader.backends[run / "imm/round-001/merged"]
        old.gate.clear()  # a request in flight on round 1
        msg = [{"role": "user", "content": "x"}]
        in_flight = asyncio.ensure_future(client.chat.completions.create(model="run/latest", messages=msg))
        await wait_for(lambda: hasattr(old, "last_params"))  # it waits at the gate

        loader.release.clear()  # round 2 appears but its engine is still loading
        write_state(run, [1, 2])
        await wait_for(lambda: "run/round-2" in server.model_ids())
        assert server.latest[0] == 1

        loader.release.set()
        await wait_for(lambda: server.latest[0] == 2)
        new = await client.chat.completions.create(model="run/latest", messages=msg)
        assert new.model == "run/round-2"
        assert not old.closed  # evicted (capacity 1) but still serving its request
        old.gate.set()
        assert (await in_flight).choices[0].message.content == "round-001 says hi"
        await wait_for(lambda: old.closed)
        assert server.pool.resident() == [run / "imm/round-002/merged"]
        # load on demand of an evicted round
        again = await client.chat.completions.create(model="run/round-1", messages=msg)
        assert again.model == "run/round-1"
        await server.stop()

    asyncio.run(main())


def test_without_load_on_demand_only_resident_rounds_are_listed(tmp_path):
    async def main():
        server, _, _ = await started(tmp_path, [1, 2], load_on_demand=False)
        client = make_client(create_app(server, KeyChecker(())))
        assert [m.id async for m in client.models.list()] == ["run/round-2", "run/latest"]
        with pytest.raises(openai.NotFoundError, match="available models: run/round-2, run/latest"):
            await client.completions.create(model="run/round-1", prompt="x")
        await server.stop()

    asyncio.run(main())


def test_a_round_that_fails_to_load_leaves_latest_where_it_was(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1])
        broken = run / "imm/round-002/merged"
        real_load = server.pool._load

        tried = []

        async def load(path):
            tried.append(path)
            if path == broken:
                raise OSError("corrupt checkpoint")
            return await real_load(path)

        server.pool._load = load
        write_state(run, [1, 2])
        await wait_for(lambda: broken in tried)
        assert server.latest[0] == 1 and server.following
        write_state(run, [1, 2, 3])
        await wait_for(lambda: server.latest[0] == 3)
        await server.stop()

    asyncio.run(main())


def test_new_rounds_are_swapped_into_warm_spare_engines(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1], resident_models=1, spare_engines=1)
        await wait_for(lambda: server.pool.spares == 1)
        assert len(loader.backends) == 1  # same path loaded twice
        loads = 2
        for n in (2, 3):
            write_state(run, list(range(1, n + 1)))
            await wait_for(lambda n=n: server.latest[0] == n and server.pool.spares == 1)
        # every swap reused an engine: the old latest became the spare, nothing was started anew
        backends = [server.pool._entries[p].backend for p in server.pool.resident()] + server.pool._spares
        assert len({id(b) for b in backends}) == loads and sum(getattr(b, "reloads", 0) for b in backends) == 2
        assert not any(b.closed for b in backends)
        await server.stop()

    asyncio.run(main())


def test_a_full_pool_reuses_the_engine_it_would_evict(tmp_path):
    async def main():
        server, loader, run = await started(tmp_path, [1, 2], resident_models=2)
        await server.pool.ensure(run / "imm/round-001/merged")  # round 1 and 2 resident
        write_state(run, [1, 2, 3])
        await wait_for(lambda: server.latest[0] == 3)
        assert len(loader.backends) == 2  # no new engine was started
        assert server.pool.resident() == [run / "imm/round-002/merged", run / "imm/round-003/merged"]
        await server.stop()

    asyncio.run(main())


# --- the Serve entry point ------------------------------------------------------------------
SERVE_CONFIG = """
http_options: {host: 127.0.0.1, port: 8000}
applications:
  - name: imm
    route_prefix: /
    import_path: services.app:app
    args: {run_dir: /data/runs/demo, engine: vllm, resident_models: 3, limits: {max_tokens: 64}}
"""


def test_a_serve_config_names_the_entry_point_and_its_args_are_settings():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    [app] = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG)).applications
    s, run_dir = settings_from_args(app.args)
    assert (run_dir, s.engine.name, s.resident_models, s.limits.max_tokens) == ("/data/runs/demo", "vllm", 3, 64)
    code = ("import sys, imm_ray.serve.deploy, imm_ray.serve.deployment\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'services'], 'the package imports services'\n"
            "import services.app\n"
            "assert services.app.app is imm_ray.serve.deploy.app_builder\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
