"""The serving app deployed from a Serve config (``import_path: services.app:app`` with ``args``,
the path ``serve run CONFIG`` / ``serve deploy`` / a RayService take: the controller builds the app)
on the hf engine, then the serving part of issue 12's fault matrix over real HTTP: a round deleted,
a round half-written, ``state.json`` replaced by garbage, a replica killed; and a bounded load test
across resident and on-demand rounds."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema
from test_serve_app import free_port, publish, wait_healthy

from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow
Q, _, GOLD = TINY_PROBLEMS[0]
MSG = [{"role": "user", "content": Q}]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, scrambled_model, tmp_path_factory):
    """Rounds 1-5 (copies of the tiny model; round 2 scrambled) served from a Serve config."""
    run = tmp_path_factory.mktemp("serve-faults") / "frun"
    run.mkdir()
    rounds = {n: run / f"imm/round-{n:03d}/merged" for n in range(1, 6)}
    for n, folder in rounds.items():
        shutil.copytree(scrambled_model if n == 2 else tiny_model_dir, folder)
    publish(run, rounds)
    port = free_port()
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    config = ServeDeploySchema.model_validate({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "imm", "route_prefix": "/", "import_path": "services.app:app",
            "args": {"run_dir": str(run), "engine": "hf", "dtype": "float32", "max_model_len": 256,
                     "resident_models": 2, "spare_engines": 0, "poll_interval_s": 0.5,
                     "limits": {"max_tokens": 48, "max_prompt_tokens": 128}},
        }],
    })
    try:
        serve_api.serve_start(http_options=config.http_options.model_dump(),
                              proxy_location="HeadOnly").deploy_apps(config)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, lambda: str(serve.status()))
        yield run, url
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(url: str, model: str, max_tokens: int = 24) -> str:
    out = client(url).chat.completions.create(model=model, messages=MSG, max_tokens=max_tokens, temperature=0)
    return out.model


def test_serve_config_deploys_the_app(app_url):
    run, url = app_url
    c = client(url)
    assert [m.id for m in c.models.list()][-2:] == ["frun/round-5", "frun/latest"]
    out = c.chat.completions.create(model="frun/latest", messages=MSG, max_tokens=40, temperature=0)
    assert out.model == "frun/round-5" and GOLD in out.choices[0].message.content
    assert str(run) not in httpx.get(f"{url}/health").text


def _health_once(url: str, cond, timeout: float = 120.0) -> dict:
    """/health's answer once ``cond`` holds for it (polled; ``timeout`` only catches a hang)."""
    deadline = time.monotonic() + timeout
    while not cond(health := httpx.get(f"{url}/health").json()):
        assert time.monotonic() < deadline, f"/health never got there: {health}"
        time.sleep(0.2)
    return health


def test_load_across_resident_and_on_demand_rounds(app_url):
    """24 clients x 4 requests over 4 model ids (2 resident slots, so rounds 1-3 take turns)."""
    _, url = app_url
    models = ["frun/round-1", "frun/round-2", "frun/round-3", "frun/latest"]
    with ThreadPoolExecutor(24) as pool:
        jobs = [pool.submit(chat, url, models[i % 4], 8) for i in range(96)]
        served = [j.result() for j in jobs]  # any failed request raises here
    assert sorted(set(served)) == ["frun/round-1", "frun/round-2", "frun/round-3", "frun/round-5"]
    assert len(httpx.get(f"{url}/health").json()["resident"]) <= 2  # engines stay bounded


def test_faults_fail_only_their_own_requests(app_url):
    run, url = app_url
    chat(url, "frun/round-2")  # resident beside latest: the damaged rounds below are not
    shutil.rmtree(run / "imm/round-003")  # deleted
    (run / "imm/round-004/merged/config.json").unlink()  # half-written
    st = run / "imm/round-001/merged/model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated
    c = client(url)
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(chat, url, "frun/latest") for _ in range(6)]
        for model, status, code in [("frun/round-3", 404, "model_not_found"),
                                    ("frun/round-4", 503, "model_unavailable"),
                                    ("frun/round-1", 503, "model_unavailable")]:
            with pytest.raises(openai.APIStatusError) as err:
                c.chat.completions.create(model=model, messages=MSG, max_tokens=8)
            assert (err.value.status_code, err.value.code) == (status, code), err.value.message
            assert str(run) not in err.value.message
        assert [j.result() for j in good] == ["frun/round-5"] * 6
    assert chat(url, "frun/round-2") == "frun/round-2"

    state = (run / "state.json").read_bytes()
    (run / "state.json").write_text("{garbage")
    health = _health_once(url, lambda h: "warning" in h)  # the follower read the garbage
    assert health["status"] == "ok" and "state.json" in health["warning"]
    assert chat(url, "frun/latest") == "frun/round-5" and chat(url, "frun/round-2") == "frun/round-2"
    (run / "state.json").write_bytes(state)
    _health_once(url, lambda h: "warning" not in h)


def test_a_killed_replica_is_replaced(app_url):
    _, url = app_url
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ImmOpenAI" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if chat(url, "frun/latest") == "frun/round-5":
                break
        except openai.APIError:
            pass
        time.sleep(2)
    else:
        pytest.fail("no replica answered after the kill")
    assert json.loads(httpx.get(f"{url}/health").text)["status"] == "ok"
