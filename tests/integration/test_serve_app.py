"""The Ray Serve app end to end with the official openai client: vLLM (AsyncLLM) with API keys,
the hf engine without, and `latest` following a new round written into state.json."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from imm_ray.serve.deploy import start_serving
from imm_ray.serve.settings import LimitSettings, ServeSettings
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, failure: Callable[[], str], timeout: float = 300.0,
                 still_up: Callable[[], None] = lambda: None) -> None:
    """Poll ``url/health`` until it answers 200; ``still_up`` runs before every poll (it asserts
    the server process lives); after ``timeout`` s fail with ``failure()`` (the server's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        still_up()
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"the server did not come up: {failure()}")


def publish(run: Path, rounds: dict[int, Path]) -> None:
    stages = {f"imm/round-{n:03d}/evaluate": {"status": "done", "info": {"model": str(p)}} for n, p in rounds.items()}
    tmp = run / ".state.tmp"
    tmp.write_text(json.dumps({"stages": stages}))
    os.replace(tmp, run / "state.json")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """One Serve instance on 127.0.0.1 with two apps over the same run: vllm+keys and hf+open."""
    run = tmp_path_factory.mktemp("serve-run") / "tinyrun"
    run.mkdir()
    publish(run, {1: tiny_model_dir})
    port = free_port()
    os.environ["IMM_API_KEYS"] = KEY
    # Ray runs workers at niceness 15: on a busy shared box a replica starting vLLM then starves.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    # No spare engine: vLLM on the CPU restarts a spare instead of swapping into it (the spare logic is
    # tests/unit/test_serve*.py's), and a second engine start per replica only competes for the CPU.
    common = dict(port=port, dtype="float32", max_model_len=256, kv_cache_gb=1, poll_interval_s=0.5,
                  resident_models=2, spare_engines=0, limits=LimitSettings(max_tokens=64, max_prompt_tokens=128))
    try:
        start_serving(run, ServeSettings(engine="vllm", app_name="vllm", route_prefix="/vllm", **common))
        os.environ.pop("IMM_API_KEYS")
        start_serving(run, ServeSettings(engine="hf", app_name="hf", route_prefix="/hf", **common))
        yield run, f"http://127.0.0.1:{port}"
    finally:
        os.environ.pop("IMM_API_KEYS", None)
        serve.shutdown()
        ray.shutdown()


def client(base: str, prefix: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/{prefix}/v1", api_key=key, max_retries=0, timeout=60)


Q, _, GOLD = TINY_PROBLEMS[0]
MSG = [{"role": "user", "content": Q}]


@pytest.mark.parametrize("prefix, key", [("vllm", KEY), ("hf", "anything")])
def test_openai_sdk_against_the_app(served, prefix, key):
    run, base = served
    c = client(base, prefix, key)
    assert [m.id for m in c.models.list()] == ["tinyrun/round-1", "tinyrun/latest"]

    chat = c.chat.completions.create(model="tinyrun/latest", messages=MSG, max_tokens=40, temperature=0)
    assert chat.model == "tinyrun/round-1" and GOLD in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop" and chat.usage.prompt_tokens > 0

    comp = c.completions.create(model="tinyrun/round-1", prompt="The answer is", max_tokens=5, temperature=0)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5

    stream = c.chat.completions.create(model="tinyrun/latest", messages=MSG, max_tokens=40, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == chat.choices[0].message.content

    with pytest.raises(openai.NotFoundError, match="tinyrun/round-1"):
        c.chat.completions.create(model="tinyrun/round-7", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        c.chat.completions.create(model="tinyrun/latest", messages=MSG, extra_body={"best_of": 3})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model="tinyrun/latest", messages=MSG, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="tinyrun/latest", messages=MSG, temperature=9)
    with pytest.raises(openai.BadRequestError, match="prompt has"):
        c.completions.create(model="tinyrun/latest", prompt="1 + 1 " * 200)
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{base}/{prefix}/v1/chat/completions", content=b"{broken", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{base}/{prefix}/v1/completions", content=b"x" * 2_000_000, headers=headers)
    assert r.status_code == 413
    assert httpx.get(f"{base}/{prefix}/health").json()["latest"] == "tinyrun/round-1"
    assert b"imm_serve_requests_total" in httpx.get(f"{base}/{prefix}/metrics", headers=headers).content
    # still healthy after every error path
    assert c.completions.create(model="tinyrun/latest", prompt="2", max_tokens=2).choices


def test_api_key_is_required_when_configured(served):
    _, base = served
    with pytest.raises(openai.AuthenticationError):
        client(base, "vllm", "wrong").models.list()
    assert httpx.get(f"{base}/vllm/health").status_code == 200  # no key needed
    assert httpx.get(f"{base}/vllm/metrics").status_code == 401


def test_latest_follows_a_new_round(served, scrambled_model, tiny_model_dir):
    """On the hf app (it loads in a second); the vLLM hot swap under load is the bench's job."""
    run, base = served
    c = client(base, "hf")
    publish(run, {1: tiny_model_dir, 2: scrambled_model})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chat = c.chat.completions.create(model="tinyrun/latest", messages=MSG, max_tokens=8, temperature=0)
        if chat.model == "tinyrun/round-2":
            break
        time.sleep(1)
    assert chat.model == "tinyrun/round-2"
    assert [m.id for m in c.models.list()] == ["tinyrun/round-1", "tinyrun/round-2", "tinyrun/latest"]
    old = c.chat.completions.create(model="tinyrun/round-1", messages=MSG, max_tokens=40, temperature=0)
    assert GOLD in old.choices[0].message.content  # the older round stays resident and queryable


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_killed_vllm_engine_fails_its_streams_and_the_replica_is_replaced(served):
    """Last in this module: SIGKILL the vLLM engine-core process under the vllm app's replica; its
    requests fail, the hf app keeps answering, and Serve's health check replaces the replica."""
    _, base = served
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if "ImmOpenAI" in a["name"] and a["name"].split("#")[0].endswith("vllm")]
    replica = ray.get_actor(name, namespace="serve")
    replica_pid = ray.get(replica.__ray_call__.remote(lambda self: os.getpid()))
    engines = [p for p in _children(replica_pid) if b"EngineCore" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert engines, "no vLLM engine-core process under the replica"
    for pid in engines:  # every resident round's
        os.kill(pid, signal.SIGKILL)
    time.sleep(2)
    with pytest.raises(openai.APIError):  # its own requests fail (no hang: the client's timeout is 60 s)
        client(base, "vllm", KEY).chat.completions.create(model="tinyrun/round-1", messages=MSG, max_tokens=8)
    assert client(base, "hf").chat.completions.create(model="tinyrun/round-1", messages=MSG, max_tokens=8).choices
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chat = client(base, "vllm", KEY).chat.completions.create(model="tinyrun/round-1", messages=MSG,
                                                                     max_tokens=40, temperature=0)
            if GOLD in chat.choices[0].message.content:
                break
        except openai.APIError:
            pass
        time.sleep(3)
    else:
        pytest.fail("the vllm app did not recover after its engine was killed")
