"""The server with LoRA adapters: the openai client names adapters in `model` (answers equal to the offline
engine's), /v1/models lists them with parent = base, an unknown model is a 404 model_not_found, runtime
load / unload under traffic (409 while the adapter has requests), per-adapter /metrics, bad adapters -> 400."""
from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from tests.lora.adapters import make_adapter
from tests.model.tiny_models import save_tiny_model
from tests.server.live import LiveServers
from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.config import ServerConfig

PROMPT = [5, 17, 99, 230, 7, 41, 300, 12, 64]


@pytest.fixture(scope="module", params=["thread", pytest.param("engine_process", marks=pytest.mark.slow)])
def env(request, tmp_path_factory, gguf_tokenizer_path):
    base = str(tmp_path_factory.mktemp("llama"))
    save_tiny_model("llama", base)
    paths = []
    for i, (rank, targets) in enumerate([(8, ["q_proj", "v_proj", "down_proj"]), (4, ["k_proj", "o_proj", "up_proj"]),
                                         (2, ["gate_proj"])]):
        p = str(tmp_path_factory.mktemp(f"ad{i}"))
        make_adapter("llama", p, rank, targets, seed=20 + i)
        paths.append(p)
    big = str(tmp_path_factory.mktemp("big"))
    make_adapter("llama", big, 32, ["q_proj"], seed=5)
    cfg = EngineConfig.from_kwargs(model=base, tokenizer=gguf_tokenizer_path, dtype="float32", enable_lora=True,
                                   lora_modules=[f"ad0={paths[0]}", f"ad1={paths[1]}"], max_loras=2,
                                   max_cpu_loras=3, max_lora_rank=8, enable_lora_runtime_updates=True,
                                   served_model_name="base")

    async def make():
        if request.param == "thread":
            return AsyncEngine.from_config(cfg).start()
        from tokenmill.engine.core_client import EngineProcClient

        return (await asyncio.to_thread(EngineProcClient.from_config, cfg)).start()

    live = LiveServers(make)
    url = live.add_app(ServerConfig())
    yield live, url, paths, big
    live.close()


def _complete(client, model, n=8):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True})
    return r.choices[0].text, r


def test_models_and_routing(env):
    live, url, paths, _ = env
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "ad0", "ad1"}
    assert models["ad0"].parent == "base" and models["base"].parent is None
    assert client.models.retrieve("ad1").parent == "base"
    texts = {m: _complete(client, m)[0] for m in ("base", "ad0", "ad1")}
    assert _complete(client, "ad1")[1].model == "ad1"  # the response names the adapter, as OpenAI echoes it
    assert len(set(texts.values())) == 3  # each adapter changes the answer
    # the same answers with several requests of the adapters and the base in one batch
    results = {}

    def run(m):
        results[m] = _complete(client, m)[0]

    threads = [threading.Thread(target=run, args=(m,)) for m in ("base", "ad0", "ad1") * 1]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == texts
    with pytest.raises(openai.NotFoundError) as e:
        _complete(client, "nope")
    assert e.value.body["code"] == "model_not_found"
    metrics = httpx.get(url + "/metrics").text
    assert 'tokenmill:lora_requests_total{lora_name="ad0"}' in metrics
    assert 'tokenmill:lora_generation_tokens_total{lora_name="ad1"}' in metrics


def test_runtime_load_unload_under_traffic(env):
    live, url, paths, big = env
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ad2", "lora_path": paths[2]})
    assert r.status_code == 200, r.text
    assert "ad2" in {m.id for m in client.models.list().data}
    ad2_text = _complete(client, "ad2")[0]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": big})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path" and "max_lora_rank" in r.text
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert r.status_code == 400
    # unloading while a long request of ad2 runs: 409; after it ends, 200
    stream = client.completions.create(model="ad2", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "ad2"})
    assert r.status_code == 409, r.text
    base_text = _complete(client, "base")[0]  # traffic goes on meanwhile
    rest = "".join(c.choices[0].text for c in stream)
    assert (first.choices[0].text + rest).startswith(ad2_text)
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "ad2"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        _complete(client, "ad2")
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "ad2"})
    assert r.status_code == 404
    assert _complete(client, "base")[0] == base_text
