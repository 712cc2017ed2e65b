"""A finished fine-tuning job's adapter is served at once as `ft:<base>:<suffix>:<id>` when the server runs with
--enable-lora (the job registers it through the engine's add_lora), and answers as trained."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.finetune.conftest import QUESTION, REPLY, fixed_reply_examples, jsonl
from tests.server.live import LiveServers
from tokenmill.server.config import ServerConfig

pytestmark = pytest.mark.slow  # an engine process and a 10-epoch job: ~30 s on a quiet 2-core CPU


@pytest.fixture(scope="module")
def served(tiny_chat_model, tmp_path_factory):
    from tokenmill.config import EngineConfig
    from tokenmill.engine.core_client import EngineProcClient

    path, tok, _ = tiny_chat_model

    async def make():
        cfg = EngineConfig.from_kwargs(model=path, tokenizer=tok, dtype="float32", max_model_len=256,
                                       enable_lora=True, max_lora_rank=8, max_loras=2)
        engine = await asyncio.to_thread(EngineProcClient.from_config, cfg)
        engine.start()
        return engine

    servers = LiveServers(make)
    url = servers.add_app(ServerConfig(finetune_dir=str(tmp_path_factory.mktemp("ft"))))
    yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    servers.close()


def _ask(client, model: str) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=10, temperature=0)
    return out.choices[0].message.content


def test_finished_job_is_served_as_its_fine_tuned_model(served):
    client = served
    base = client.models.list().data[0].id
    before = _ask(client, base)
    assert not before.startswith(REPLY)
    f = client.files.create(file=("data.jsonl", jsonl(fixed_reply_examples(4))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=base, training_file=f.id, suffix="secret", seed=1,
        hyperparameters={"n_epochs": 10, "batch_size": 2, "learning_rate_multiplier": 20},
        extra_body={"lora_rank": 8, "target_modules": "all"})
    deadline = time.monotonic() + 240
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(0.2)
    assert job.status == "succeeded", job.error
    name = job.fine_tuned_model
    deadline = time.monotonic() + 30
    while name not in (ids := [m.id for m in client.models.list().data]):
        assert time.monotonic() < deadline, ids
        time.sleep(0.1)
    card = next(m for m in client.models.list().data if m.id == name)
    assert card.model_extra["parent"] == base
    assert _ask(client, name).startswith(REPLY)
    assert _ask(client, base) == before  # the base model is untouched
