"""The files and fine-tuning routes end to end with the `openai` client, on a tiny model served as `tokenmill
serve` does (the engine core in its own process)."""
from __future__ import annotations

import asyncio
import os
import time

import openai
import pytest

from tests.finetune.conftest import fixed_reply_examples, jsonl
from tests.server.live import LiveServers
from tokenmill.server.config import ServerConfig

pytestmark = pytest.mark.slow  # an engine process and a training job: ~20 s on a quiet 2-core CPU


@pytest.fixture(scope="module")
def served(tiny_chat_model, tmp_path_factory):
    from tokenmill.config import EngineConfig
    from tokenmill.engine.core_client import EngineProcClient

    path, tok, _ = tiny_chat_model

    async def make():
        cfg = EngineConfig.from_kwargs(model=path, tokenizer=tok, dtype="float32", max_model_len=256)
        engine = await asyncio.to_thread(EngineProcClient.from_config, cfg)
        engine.start()
        return engine

    servers = LiveServers(make)
    registered: list[tuple[str, str]] = []
    url = servers.add_app(ServerConfig(finetune_dir=str(tmp_path_factory.mktemp("ft"))),
                          register_adapter=lambda name, p: registered.append((name, p)))
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    yield client, registered
    servers.close()


def _wait(client, job_id: str, statuses: tuple[str, ...], timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status}")


def test_malformed_file_is_a_400_naming_the_line(served):
    client, _ = served
    bad = jsonl(fixed_reply_examples(2)) + b'{"messages": [{"role": "user", "content": "no reply"}]}\n'
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    err = e.value.body
    assert e.value.status_code == 400 and err["message"].startswith("line 3:") and err["param"] == "file"
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", b'{"messages": \n'), purpose="fine-tune")
    assert "line 1" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("ok.jsonl", jsonl(fixed_reply_examples(2))), purpose="assistants")
    assert e.value.body["param"] == "purpose"


def test_fine_tune_job_end_to_end(served):
    client, registered = served
    base = client.models.list().data[0].id
    f = client.files.create(file=("data.jsonl", jsonl(fixed_reply_examples(4))), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes > 0
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list().data]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=base, training_file=f.id, hyperparameters={"n_epochs": 0})
    assert e.value.body["param"] == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="other", training_file=f.id)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=base, training_file="file-nope")
    assert e.value.body["param"] == "training_file"

    job = client.fine_tuning.jobs.create(
        model=base, training_file=f.id, suffix="secret", seed=1,
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 20},
        extra_body={"lora_rank": 4, "target_modules": ["q_proj", "v_proj"]})
    assert job.status in ("queued", "running") and job.hyperparameters.n_epochs == 2
    done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"ft:{base}:secret:") and done.trained_tokens > 0
    path = done.model_extra["adapter_path"]
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    deadline = time.monotonic() + 10
    while not registered and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registered == [(done.fine_tuned_model, path)]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 4 and "train_loss" in metrics[0].data
    assert events[0].created_at >= events[-1].created_at  # newest first
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more

    # a long job, cancelled mid-way: the engine stops it
    long = client.fine_tuning.jobs.create(model=base, training_file=f.id, hyperparameters={"n_epochs": 100})
    running = _wait(client, long.id, ("running",))
    assert running.status == "running"
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msgs = [e.message for e in client.fine_tuning.jobs.list_events(long.id, limit=100).data]
        if "Job cancelled" in msgs:  # the engine's confirmation: its LoRA state is dropped
            break
        time.sleep(0.1)
    assert "Job cancelled" in msgs
    assert client.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(long.id)
    ids = [j.id for j in client.fine_tuning.jobs.list().data]
    assert ids[:2] == [long.id, job.id]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    # serving goes on
    out = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].message.content is not None


def test_engine_thread_runs_jobs(tiny_chat_model, tmp_path):
    """--no-engine-process: AsyncEngine takes jobs on its command queue and reports them on the event loop."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.finetune.jobs import resolve_hyperparameters
    from tokenmill.finetune.offline import make_spec

    path, tok, _ = tiny_chat_model

    async def run() -> list:
        cfg = EngineConfig.from_kwargs(model=path, tokenizer=tok, dtype="float32", max_model_len=256)
        engine = await asyncio.to_thread(AsyncEngine.from_config, cfg)
        engine.start()
        updates: list = []
        try:
            engine.finetune_listen(updates.extend)
            exs = [e["messages"] for e in fixed_reply_examples(2)]
            hp = resolve_hyperparameters({"n_epochs": 1, "batch_size": 2}, {}, 2, 0)
            engine.finetune_submit(make_spec(engine.processor, exs, hp, "ftjob-a", str(tmp_path / "a"), "tiny",
                                             "ft:tiny:a", 512))
            deadline = time.monotonic() + 120
            while not any(u.status == "succeeded" for u in updates) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await engine.shutdown(grace_s=0.0)
        return updates

    updates = asyncio.run(run())
    assert [u.status for u in updates][-1] == "succeeded"
    assert os.path.isfile(tmp_path / "a" / "adapter_model.safetensors")
